"""A site's answer to the server's registration query: its name and declared data sizes.

The server binds the answering node to this site name; the declared sizes bound every count
the site reports later (``omnifuse_model.federation_replies``). The counts are the ones a
round reports: training samples, training samples holding each modality, validation size.
"""

from __future__ import annotations

from client.local_training import _availability
from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.federation_replies import SiteDeclaration
from omnifuse_model.site_data import SiteDatasets


def site_declaration(
    site_name: str, datasets: SiteDatasets, model_config: OmniFuseConfig
) -> SiteDeclaration:
    """What this site declares before round 1 (the same counting as ``train_round``)."""
    availability = _availability(datasets.train)
    return SiteDeclaration(
        site=site_name,
        num_train=int(availability.shape[0]),
        num_val=len(datasets.val),
        num_present={
            name: int(availability[:, index].sum())
            for index, name in enumerate(model_config.modality_names)
        },
    )
