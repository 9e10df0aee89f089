"""The drift_monitor workload: check one live-input window, or watch a folder of them, for drift
against the served model's training data (`flowops.drift` does the statistics).

Its config is one model on both sides of the job boundary: `flowops monitor drift --as-job|--watch`
sends `DriftMonitorConfig(...).model_dump_json()`, `python -m flowops.workloads.drift_monitor` parses it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flowops.drift import DriftConfig, DriftReport, run_drift_check, watch
from flowops.settings import Settings


class DriftMonitorConfig(BaseModel):
    """What to check (one window file, or a folder to watch), against what, and how."""

    model_config = ConfigDict(extra="forbid")

    window: Path | None = Field(None, description="One window file (.npy or .parquet) to check.")
    watch: Path | None = Field(None, description="A folder to watch for new window files.")
    model_uri: str | None = Field(None, description="Default: models:/<model_name>@production.")
    data_version: str | None = Field(None, description="Reference data version (default: the "
                                     "model's training data version, else the latest).")
    interval_s: float = Field(60.0, gt=0, description="Seconds between polls (watch).")
    max_checks: int | None = Field(None, ge=1, description="Stop after N checks (watch).")
    stop_after_s: float | None = Field(None, gt=0, description="Stop after N seconds (watch).")
    trigger: bool = Field(True, description="Emit drift_detected to the loop when drifted.")
    drift: DriftConfig = Field(default_factory=DriftConfig, description="The statistical tests.")

    @model_validator(mode="after")
    def _one_source(self) -> DriftMonitorConfig:
        if (self.window is None) == (self.watch is None):
            raise ValueError("give exactly one of window (a file) and watch (a folder)")
        return self


def run_drift_monitor(settings: Settings, config: DriftMonitorConfig) -> list[DriftReport]:
    """One check of `window`, or the checks of the windows arriving in `watch`."""
    common = {"model_uri": config.model_uri, "data_version": config.data_version,
              "config": config.drift, "trigger": config.trigger}
    if config.window is not None:
        return [run_drift_check(settings, config.window, **common)]
    return watch(settings, config.watch, interval_s=config.interval_s,
                       max_checks=config.max_checks, stop_after_s=config.stop_after_s, **common)
