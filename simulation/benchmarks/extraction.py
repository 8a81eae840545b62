"""Throughput of the whole feature-extraction pipeline against the bare backbone forward.

    python -m simulation.benchmarks.extraction [--stays 240] [--batch 32] [--workers 0 1 2]
        [--image-size 512] [--upscale-to 0] [--repeats 2] [--out benchmark_results/extraction.json]

Pipeline: :func:`~omnifuse_model.data.features.cache.prepare_site` on a fresh cache, i.e. ingest,
then the ``cxr`` pass (hash, read, decode, resize, normalise, collate, ResNet-34 trunk, write
shards) and the ``rep`` pass (tokenise, BERT, float16 check, write shards); the per-modality seconds
of its :class:`~omnifuse_model.data.features.cache.PrepareSummary` separate the two passes from
ingest.
Both backbones are built once beforehand and handed to ``prepare_site`` (so neither pass
pays for building a model, loading ``transformers`` or training the fallback's tokenizer;
that setup is reported on its own). Bare: the same backbones on ready inputs, the same number
of items in batches of the same sizes, under ``torch.inference_mode()``: the trunk on a
pre-made ``[B, 3, 224, 224]`` tensor, the BERT's ``model(input_ids, attention_mask)`` on the
reports' pre-tokenised ids. Each repeat times bare, pipeline, bare again, and compares the
pipeline with the mean of the two bare runs, so that load drifting on a shared machine
biases neither side. Target (issue): pipeline >= 0.8 x bare.

Data: synthetic MIMIC (phenotyping cohort, so every stay is kept; one AP image and one report
per stay) with ``--image-size`` px JPEGs. The writer stops at 512 px while MIMIC-CXR-JPG images
are ~2500-3000 px; ``--upscale-to 2800`` re-encodes the JPEGs at that size so that decoding
costs what it does on real data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch import Tensor

from omnifuse_model.data.features.backbones import TextBackbone, build_resnet34_trunk
from omnifuse_model.data.features.cache import prepare_site
from omnifuse_model.data.ingest import ingest_site
from omnifuse_model.site_config import BackboneConfig, SiteConfig
from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic

TARGET_RATIO = 0.8
TASK = "phenotyping"


def make_site(data_dir: Path, cache_dir: Path, backbones: BackboneConfig) -> SiteConfig:
    return SiteConfig(
        name="extraction_bench",
        task=TASK,
        modalities=["ehr", "cxr", "rep"],
        cache_dir=cache_dir,
        device="cpu",
        backbones=backbones,
        data={
            "benchmark_dir": data_dir / TASK,
            "stays_csv": data_dir / "root" / "all_stays.csv",
            "cxr_dir": data_dir / "mimic-cxr-jpg",
            "reports_dir": data_dir / "mimic-cxr-reports",
        },
    )


def batch_sizes(n: int, batch: int) -> list[int]:
    return [min(batch, n - start) for start in range(0, n, batch)]


def cpu_seconds() -> float:
    """CPU time of this process (every thread) and of its reaped children (loader workers)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def timed(work: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU) seconds of ``work()``."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    work()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def bare_images(trunk: torch.nn.Module, n: int, batch: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the trunk forward over ``n`` ready images in batches."""
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        trunk(images[:2])  # warm-up
        return timed(lambda: [trunk(images[:size]) for size in batch_sizes(n, batch)])


def bare_reports(text: TextBackbone, tokens: list[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """(wall, CPU) seconds of the BERT forward over pre-tokenised batches (ids, mask)."""
    with torch.inference_mode():
        text.model(input_ids=tokens[0][0][:2], attention_mask=tokens[0][1][:2])  # warm-up
        return timed(lambda: [text.model(input_ids=i, attention_mask=m) for i, m in tokens])


def build_backbones(site: SiteConfig, batch: int) -> dict:
    """Trunk, text backbone (fallback trained on the train split's reports, as prepare_site
    would) and the unique report texts pre-tokenised in batches; with setup seconds."""
    setup: dict[str, float] = {}
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = ingest_site(site)
    setup["ingest_s"], setup["ingest_cpu_s"] = time.perf_counter() - wall, cpu_seconds() - cpu
    clock = time.perf_counter()
    trunk = build_resnet34_trunk(site.backbones.resnet34_weights).eval()
    setup["trunk_build_s"] = time.perf_counter() - clock
    train = [s.report_text for s in result.split("train") if s.report_text is not None]
    texts = list(dict.fromkeys(s.report_text for s in result.stays if s.report_text is not None))
    clock = time.perf_counter()
    bert_dir = site.backbones.bert_dir
    text = TextBackbone(bert_dir, fallback_texts=None if bert_dir else train)
    setup["text_backbone_build_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    # the tokenizer call encode() makes, kept apart from the forward (private by design)
    tokens = [text._tokenize(texts[i : i + batch]) for i in range(0, len(texts), batch)]
    setup["tokenise_all_s"] = time.perf_counter() - clock
    images = {str(s.image_path) for s in result.stays if s.image_path is not None}
    return {"trunk": trunk, "text": text, "tokens": tokens, "images": len(images),
            "reports": len(texts), "setup": setup,
            "identities": {"cxr": trunk.identity, "rep": text.identity}}  # fmt: skip


def measure(site: SiteConfig, models: dict, workers: int, batch: int) -> dict:
    """One repeat: bare forwards, prepare_site on a fresh cache, bare forwards again (the
    bare time is the mean of both, so that load drifting during the run biases no side).
    CPU seconds of the image pass: from the end of ingest (ingest's CPU measured in setup)
    to the text backbone factory's call, which opens the report pass."""
    load_before = os.getloadavg()[0]
    bare_img = [bare_images(models["trunk"], models["images"], batch)]
    bare_rep = [bare_reports(models["text"], models["tokens"])]
    shutil.rmtree(site.cache_dir, ignore_errors=True)
    marks = [cpu_seconds()]

    def text_factory(_train_texts: object) -> TextBackbone:
        marks.append(cpu_seconds())
        return models["text"]

    summary = prepare_site(site, progress=False, batch_size=batch, num_workers=workers,
                           image_backbone=models["trunk"], text_backbone=text_factory)  # fmt: skip
    marks.append(cpu_seconds())
    bare_img.append(bare_images(models["trunk"], models["images"], batch))
    bare_rep.append(bare_reports(models["text"], models["tokens"]))
    cxr, rep = summary.modalities["cxr"], summary.modalities["rep"]
    if cxr.misses != models["images"] or rep.misses != models["reports"] or cxr.failed:
        raise RuntimeError(f"unexpected work: cxr {cxr}, rep {rep} (cache not fresh?)")
    image_cpu = marks[1] - marks[0] - models["setup"]["ingest_cpu_s"]
    bare = {name: [statistics.fmean(t[i] for t in runs) for i in (0, 1)]
            for name, runs in (("img", bare_img), ("rep", bare_rep))}  # fmt: skip
    n_img, n_rep = cxr.misses, rep.misses
    return {
        "workers": workers,
        "images": n_img,
        "reports": n_rep,
        "bare_images_per_s": n_img / bare["img"][0],
        "pipeline_images_per_s": n_img / cxr.seconds,
        "image_ratio": bare["img"][0] / cxr.seconds,
        "image_cpu_ratio": bare["img"][1] / image_cpu,
        "bare_reports_per_s": n_rep / bare["rep"][0],
        "pipeline_reports_per_s": n_rep / rep.seconds,
        "report_ratio": bare["rep"][0] / rep.seconds,
        "report_cpu_ratio": bare["rep"][1] / (marks[2] - marks[1]),
        "ingest_s": summary.modalities["ehr"].seconds,
        "image_pass_s": cxr.seconds,
        "report_pass_s": rep.seconds,
        "image_pass_cpu_s": image_cpu,
        "report_pass_cpu_s": marks[2] - marks[1],
        "prepare_total_s": summary.seconds,
        "bare_image_wall_cpu_s": bare_img,
        "bare_report_wall_cpu_s": bare_rep,
        "load_1min": [load_before, os.getloadavg()[0]],
    }


def summarise(runs: list[dict]) -> dict:
    """Medians per worker count."""
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    by_workers: dict[int, list[dict]] = {}
    for run in runs:
        by_workers.setdefault(run["workers"], []).append(run)
    return {
        str(workers): {k: statistics.median(r[k] for r in group) for k in keys}
        | {"repeats": len(group), "load_1min_max": max(max(r["load_1min"]) for r in group)}
        for workers, group in by_workers.items()
    }


def write_data(work: Path, args: argparse.Namespace) -> Path:
    """Synthetic MIMIC, one AP image and one report per stay; ``--upscale-to`` re-encodes
    every JPEG at that side (bicubic, quality 95) to decode like MIMIC-CXR-JPG's images."""
    data_dir = work / f"data_s{args.stays}_px{args.image_size}_up{args.upscale_to}_{args.seed}"
    if (data_dir / "ready").is_file():
        return data_dir
    shutil.rmtree(data_dir, ignore_errors=True)
    config = SyntheticMimicConfig(num_stays=args.stays, seed=args.seed,
                                  image_size=args.image_size, cxr_missing_rate=0.0,
                                  report_missing_rate=0.0, decoy_image_rate=0.0)  # fmt: skip
    write_synthetic_mimic(config, data_dir, progress=False)
    for path in sorted((data_dir / "mimic-cxr-jpg").rglob("*.jpg")) if args.upscale_to else ():
        with Image.open(path) as image:
            large = image.resize((args.upscale_to,) * 2, Image.Resampling.BICUBIC)
        large.save(path, quality=95)
    (data_dir / "ready").touch()
    return data_dir


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="omnifuse-extraction-"))
    data_dir = write_data(work, args)
    backbones = BackboneConfig(resnet34_weights=args.resnet34_weights, bert_dir=args.bert_dir)
    site = make_site(data_dir, work / "cache", backbones)
    models = build_backbones(site, args.batch)
    runs = []
    try:
        for _ in range(args.repeats):
            for workers in args.workers:
                runs.append(measure(site, models, workers, args.batch))
    finally:
        shutil.rmtree(work / "cache", ignore_errors=True)
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    machine = {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count()}
    return {
        "settings": vars(args) | {"task": TASK, "data": "synthetic MIMIC"},
        "machine": machine | {"threads": torch.get_num_threads()},
        "measured": "bare: trunk(x) on a ready [B, 3, 224, 224] tensor and TextBackbone.model"
        "(input_ids, attention_mask) on pre-tokenised ids, inference_mode; pipeline: the "
        "per-modality seconds of prepare_site on a fresh cache, backbones built beforehand",
        "identities": models["identities"],
        "setup": models["setup"],
        "runs": runs,
        "summary": summarise(runs),
        "targets": {"pipeline_over_bare_min": TARGET_RATIO},
    }


def print_report(result: dict, console: Console) -> None:
    run, settings = result["runs"][0], result["settings"]
    size = f"{settings['image_size']} px" + (
        f" upscaled to {settings['upscale_to']} px" if settings["upscale_to"] else ""
    )
    table = Table(
        title=f"Feature extraction: {run['images']} images ({size} JPEGs), {run['reports']} "
        "reports, batch {batch}, {threads} torch threads, medians of {repeats}".format(**settings)
    )
    for column in ("workers", "img/s", "bare img/s", "img ratio", "img CPU ratio", "rep/s",
                   "bare rep/s", "rep ratio", "rep CPU ratio", "ingest s", "max load"):  # fmt: skip
        table.add_column(column, justify="right")
    for workers, row in result["summary"].items():
        table.add_row(workers, *(f"{row[k]:.2f}" for k in (
            "pipeline_images_per_s", "bare_images_per_s", "image_ratio", "image_cpu_ratio",
            "pipeline_reports_per_s", "bare_reports_per_s", "report_ratio", "report_cpu_ratio",
            "ingest_s", "load_1min_max")))  # fmt: skip
    console.print(table)
    setup = ", ".join(f"{k} {v:.2f}" for k, v in result["setup"].items())
    console.print(f"setup (outside the timed passes): {setup}")
    console.print(
        f"ratio: pipeline / bare throughput (target >= {TARGET_RATIO}); CPU ratio: bare CPU "
        "seconds / the pass's CPU seconds, loader workers included"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stays", type=int, default=240, help="one image + report per stay")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--image-size", type=int, default=512, choices=range(224, 513),
                        metavar="224..512", help="synthetic JPEG side (px)")  # fmt: skip
    parser.add_argument("--upscale-to", type=int, default=0, metavar="PX",
                        help="re-encode the JPEGs at PX x PX (0: keep --image-size)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--resnet34-weights", type=Path, default=None)
    parser.add_argument("--bert-dir", type=Path, default=None)
    parser.add_argument("--work-dir", default=None, help="keep the synthetic data here")
    parser.add_argument("--out", default="benchmark_results/extraction.json")
    args = parser.parse_args(argv)
    result = run(args)
    print_report(result, Console(width=max(Console().width, 120)))  # 11 columns
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
