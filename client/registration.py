"""A site's answer to the server's registration query: its name and declared data sizes.

The server binds the answering node to this site name; the declared sizes bound every count
the site reports later (``omnifuse_model.federation_replies``). The counts are the ones a
round reports: training samples, training samples holding each modality, validation size,
each published as a round publishes it (``suppression.published_count`` with the run's
audit-min-count, which the registration query carries), so an honest site's later counts
never exceed its declared ones and the declaration tells the server nothing more.
"""

from __future__ import annotations

from client.local_training import _availability
from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.federation_replies import SiteDeclaration
from omnifuse_model.site_data import SiteDatasets
from omnifuse_model.suppression import published_count


def site_declaration(
    site_name: str, datasets: SiteDatasets, model_config: OmniFuseConfig, threshold: int
) -> SiteDeclaration:
    """What this site declares before round 1 (the same counting and rounding as
    ``train_round`` and ``evaluate_global`` with audit-min-count ``threshold``)."""
    availability = _availability(datasets.train)
    return SiteDeclaration(
        site=site_name,
        num_train=published_count(int(availability.shape[0]), threshold),
        num_val=published_count(len(datasets.val), threshold),
        num_present={
            name: published_count(int(availability[:, index].sum()), threshold)
            for index, name in enumerate(model_config.modality_names)
        },
    )
