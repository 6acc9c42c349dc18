"""Sinks beyond the trainer's loggers: W&B extras (heatmaps, events) and the heatmap renderer."""

from stabmon.sinks.heatmap import render_heatmap
from stabmon.sinks.wandb import WandbExtras

__all__ = ["WandbExtras", "render_heatmap"]
