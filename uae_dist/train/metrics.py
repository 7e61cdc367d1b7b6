"""Rank-0 metric sinks: CSV files (train.csv, val.csv), TensorBoard, and log lines."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

log = logging.getLogger("uae_dist.train")


class CSVLog:
    """Append rows to a CSV with a fixed header; on resume, rows after ``resume_step`` are dropped."""

    def __init__(self, path, fields: list[str], resume_step: int | None = None):
        self.path, self.fields = Path(path), list(fields)
        keep = []
        if self.path.exists() and resume_step is not None:
            with self.path.open() as fh:
                keep = [r for r in csv.DictReader(fh) if int(float(r["step"])) <= resume_step]
        with self.path.open("w", newline="") as fh:  # fresh run: new file; resume: history up to the checkpoint
            w = csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(keep)

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore").writerow(
                {k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_csv(path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


class Metrics:
    def __init__(self, out_dir, targets: list[str], enabled: bool, tensorboard: bool,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.targets = targets
        self.tb = None
        if not enabled:
            return
        out = Path(out_dir)
        self.train = CSVLog(out / "train.csv", ["step", "epoch", "loss", *[f"loss_{t}" for t in targets], "lr",
                                                 "structures_per_s", "atoms_per_s", "elapsed_s",
                                                 "cpu_user_s", "cpu_sys_s", "gpu_peak_gib"], resume_step)
        self.val = CSVLog(out / "val.csv", ["step", "epoch", *[f"mae_{t}" for t in targets],
                                             *[f"mean_predictor_mae_{t}" for t in targets], "score", "n_val",
                                             "elapsed_s"], resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step + 1 if resume_step else None)
            except Exception as e:  # pragma: no cover - tensorboard missing
                log.warning("TensorBoard disabled: %s", e)

    def log_train(self, row: dict) -> None:
        if not self.enabled:
            return
        self.train.write(row)
        if self.tb:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def log_val(self, row: dict) -> None:
        if not self.enabled:
            return
        self.val.write(row)
        if self.tb:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"val/{k}", v, row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb:
            self.tb.close()
