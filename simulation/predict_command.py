"""`omnifuse predict CHECKPOINT SITE.toml --out preds.csv`: one row per test stay of the site.

Columns: ``stay`` (the site's own local stay id: the file stays at the site), the predicted
risk (``risk`` for a binary task; ``risk_<k>`` per label or class otherwise), then per modality
of the checkpoint's model, in its order, ``present_<m>`` (the stay holds it at this site) and
``imputed_<m>`` (it did not, so the model completed it: forward imputation from the present
modalities when the model has it, else its learned placeholder). ``imputed_<m>`` is always
``not present_<m>``; both are written so that a reader need not know that rule. A modality
the site does not hold at all is imputed for every stay.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from rich.console import Console

DESCRIPTION = "per-stay risk and modality presence of a checkpoint on a site's test split"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `predict` on the `omnifuse` command parser."""
    predict = commands.add_parser("predict", help=DESCRIPTION, description=__doc__)
    predict.add_argument("checkpoint", help="checkpoint folder, run folder or checkpoints/latest")
    predict.add_argument("site", help="the site config TOML whose test split is predicted")
    predict.add_argument("--out", required=True, help="the CSV file to write")
    predict.set_defaults(handler=run)


def predict_dataset(model, data, batch_size: int = 256):
    """Predicted probabilities of every sample as a numpy array in the dataset's order
    ([N] or [N, C])."""
    import torch

    from omnifuse_model.training import iterate_batches

    model.eval()
    parts = []
    with torch.no_grad():
        for batch in iterate_batches(data, batch_size):
            output = model(batch.inputs, batch.availability, batch.masks)
            parts.append(model.predict_proba(output.logits.float()).cpu())
    return torch.cat(parts).numpy()


def prediction_rows(names: list[str], data, probabilities) -> tuple[list, list]:
    """(header, rows) of the predictions CSV (see the module docstring)."""
    risks = probabilities.reshape(len(data), -1)
    risk_columns = ["risk"] if risks.shape[1] == 1 else [f"risk_{k}" for k in range(risks.shape[1])]
    header = ["stay", *risk_columns]
    for name in names:
        header += [f"present_{name}", f"imputed_{name}"]
    rows = []
    availability = data.availability.tolist()
    for index, stay in enumerate(data.sample_ids):
        row = [stay, *(f"{value:.6f}" for value in risks[index])]
        for held in availability[index]:
            row += [bool(held), not held]
        rows.append(row)
    return header, rows


def run(args: argparse.Namespace) -> int:
    from omnifuse_model.site_config import load_site_config
    from simulation.site_checkpoint import load_checkpoint, site_test_data

    out = Path(args.out)
    if out.is_dir():
        raise IsADirectoryError(f"predict --out {out}: is a folder, expected a CSV file path")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"predict --out {out}: folder {out.parent} not found")
    loaded = load_checkpoint(args.checkpoint)
    site = load_site_config(args.site)
    data = site_test_data(loaded, site)
    probabilities = predict_dataset(loaded.model, data)
    header, rows = prediction_rows(loaded.model.config.modality_names, data, probabilities)
    with out.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    Console().print(f"{len(rows)} predictions of site '{site.name}' written to {out}")
    return 0
