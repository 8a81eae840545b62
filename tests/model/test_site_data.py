"""A site's view of feature-level data: modalities it does not hold are absent."""

from __future__ import annotations

import torch

from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.site_config import SiteConfig
from omnifuse_model.site_data import _absent_outside_site
from omnifuse_model.synthetic import (
    SyntheticFeatureConfig,
    SyntheticModality,
    make_synthetic_features,
)


def test_site_view_hides_modalities_outside_the_site_and_leaves_the_source_unchanged():
    synthetic = SyntheticFeatureConfig(
        modalities=[
            SyntheticModality(name=name, dim=4, signal=1.0, noise=1.0, missing_rate=rate)
            for name, rate in (("a", 0.5), ("b", 0.0), ("c", 0.3))
        ],
        seed=3,
    )
    data = make_synthetic_features(synthetic, 200)
    before = {k: v.clone() for k, v in data.inputs.items()}, data.availability.clone()
    model = OmniFuseConfig(modalities=synthetic.modality_specs(), task="binary", d=8)
    site = SiteConfig.model_validate(
        {
            "name": "s",
            "task": "in-hospital-mortality",
            "modalities": ["a", "c"],
            "data": {
                "source": "synthetic_features",
                "synthetic": synthetic.model_dump(),
                "synthetic_sizes": [200, 50],
            },
        }
    )

    view = _absent_outside_site(data, model, site)

    for name, tensor in before[0].items():
        torch.testing.assert_close(data.inputs[name], tensor)
    assert torch.equal(data.availability, before[1])
    keep = (before[1][:, 0] | before[1][:, 2]).nonzero().squeeze(1)
    assert len(view) == len(keep)  # samples holding neither a nor c are dropped
    assert not view.availability[:, 1].any()
    assert torch.equal(view.availability[:, [0, 2]], before[1][keep][:, [0, 2]])
    assert torch.count_nonzero(view.inputs["b"]) == 0
    assert view.sample_ids == [data.sample_ids[i] for i in keep.tolist()]
    torch.testing.assert_close(view.labels, data.labels[keep])
