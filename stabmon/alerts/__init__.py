"""Alert channels (logging, W&B, Slack-compatible webhook) and the de-duplicating dispatcher."""

from stabmon.alerts.base import Alert, AlertChannel, AlertDispatcher
from stabmon.alerts.channels import LogAlert, WandbAlert, WebhookAlert

__all__ = ["Alert", "AlertChannel", "AlertDispatcher", "LogAlert", "WandbAlert", "WebhookAlert"]
