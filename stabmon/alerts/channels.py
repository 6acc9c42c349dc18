"""Alert channels: Python logging, W&B alerts, Slack-compatible webhooks."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from datetime import timedelta

from stabmon._validation import check_positive_float, check_positive_int
from stabmon.alerts.base import Alert, AlertChannel

__all__ = ["LogAlert", "WandbAlert", "WebhookAlert"]

_LOG_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}


class LogAlert(AlertChannel):
    """Alerts as Python log records on the ``stabmon.alerts`` logger (or ``logger_name``).

    Example:
        >>> LogAlert()
        LogAlert(logger_name='stabmon.alerts')
    """

    def __init__(self, logger_name: str = "stabmon.alerts") -> None:
        self.logger_name = logger_name
        self._log = logging.getLogger(logger_name)

    def send(self, alert: Alert) -> None:
        self._log.log(_LOG_LEVELS.get(alert.level, logging.WARNING), "%s\n%s", alert.title, alert.text)

    def __repr__(self) -> str:
        return f"LogAlert(logger_name={self.logger_name!r})"


class WandbAlert(AlertChannel):
    """``wandb.alert`` on the active run, level by severity, throttled by ``wait_duration``.

    W&B itself drops an alert with the same title sent again within ``wait_duration``
    seconds (default 300). Without an active run the alert is skipped (reported once).
    """

    def __init__(self, wait_duration: float = 300.0) -> None:
        check_positive_float("wait_duration", wait_duration)
        self.wait_duration = wait_duration
        self._warned = False

    def send(self, alert: Alert) -> None:
        import wandb  # lazily: the GPU image and minimal installs may lack it

        if wandb.run is None:
            if not self._warned:
                self._warned = True
                logging.getLogger("stabmon.alerts").warning("stabmon: WandbAlert has no active W&B run; skipped")
            return
        level = {"info": wandb.AlertLevel.INFO, "warning": wandb.AlertLevel.WARN, "critical": wandb.AlertLevel.ERROR}
        wandb.alert(title=alert.title, text=alert.text, level=level.get(alert.level, wandb.AlertLevel.WARN),
                    wait_duration=timedelta(seconds=self.wait_duration))

    def __repr__(self) -> str:
        return f"WandbAlert(wait_duration={self.wait_duration})"


class WebhookAlert(AlertChannel):
    """Slack-compatible JSON POST (``{"text": ...}``) to ``url`` or ``$STABMON_WEBHOOK_URL``.

    Sending happens on a background thread, so a slow or dead receiver never holds up a
    training step; ``send`` only queues (a full queue drops the alert). Each POST has a
    ``timeout`` and is retried ``retries`` times with exponential back-off from ``backoff``
    seconds; a 4xx answer is not retried. The URL is a secret: it is never logged, never
    in ``repr`` and never in a checkpoint.

    Args:
        url: the webhook URL; None reads ``STABMON_WEBHOOK_URL``.
        timeout: seconds per POST. Default 5.
        retries: further attempts after a failure. Default 3.
        backoff: first wait between attempts, doubled each time. Default 1.
        max_queue: alerts waiting to be sent. Default 100.

    Raises:
        ValueError: no URL given and ``STABMON_WEBHOOK_URL`` unset, or a URL that is not http(s).

    Example:
        >>> WebhookAlert(url="https://hooks.example.com/T000/B000/XXXX")
        WebhookAlert(url=<set>, timeout=5.0, retries=3)
    """

    def __init__(
        self, url: str | None = None, *, timeout: float = 5.0, retries: int = 3, backoff: float = 1.0,
        max_queue: int = 100,
    ) -> None:
        url = url if url is not None else os.environ.get("STABMON_WEBHOOK_URL")
        if not url:
            raise ValueError("`url` must be given, or the STABMON_WEBHOOK_URL environment variable set")
        if not url.startswith(("http://", "https://")):
            raise ValueError("`url` must start with http:// or https:// (the value is not shown: it is a secret)")
        check_positive_float("timeout", timeout)
        check_positive_float("backoff", backoff)
        check_positive_int("max_queue", max_queue)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"`retries` must be a non-negative int, got {retries!r}")
        self._url = url
        self.timeout, self.retries, self.backoff = float(timeout), retries, backoff
        self.sent = 0
        self.failed = 0
        self._queue: queue.Queue[Alert | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._said_failure = False

    def __repr__(self) -> str:
        return f"WebhookAlert(url=<set>, timeout={self.timeout}, retries={self.retries})"

    def __getstate__(self) -> dict:
        raise TypeError("WebhookAlert holds a secret URL and is not pickled")

    def send(self, alert: Alert) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._worker, name="stabmon-webhook", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            self.failed += 1

    def close(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` seconds for queued alerts to go out."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _worker(self) -> None:
        while True:
            alert = self._queue.get()
            try:
                if alert is not None:
                    self._deliver(alert)
            finally:
                self._queue.task_done()

    def _deliver(self, alert: Alert) -> None:
        body = json.dumps({"text": f"*{alert.title}*\n{alert.text}"}).encode()
        wait = self.backoff
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self._url, data=body, headers={"Content-Type": "application/json"},
                                             method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    if 200 <= response.status < 300:
                        self.sent += 1
                        return
            except urllib.error.HTTPError as err:
                if 400 <= err.code < 500:
                    break  # the receiver refuses this payload: retrying will not help
            except (urllib.error.URLError, OSError, TimeoutError):
                pass
            if attempt < self.retries:
                time.sleep(wait)
                wait *= 2
        self.failed += 1
        if not self._said_failure:
            self._said_failure = True
            # The URL is a secret: name the channel, never the address.
            logging.getLogger("stabmon.alerts").warning(
                "stabmon: a webhook alert could not be delivered after %d attempts; training goes on", self.retries + 1
            )
