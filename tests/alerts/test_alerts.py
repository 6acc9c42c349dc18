import json
import logging
import pickle
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from stabmon import StabilityMonitor
from stabmon.alerts import Alert, AlertChannel, AlertDispatcher, LogAlert, WebhookAlert
from stabmon.detectors import Finding
from stabmon.interventions import Action
from tests.callbacks.test_stability_monitor_actions import FAST, Faulty
from tests.helpers import quiet_trainer, token_loader


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers with ``status`` and keeps the bodies."""

    def __init__(self, status=200):
        self.bodies, self.status = [], status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                receiver.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/T000/SECRET-TOKEN"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def alert(step=5, level="warning"):
    f = Finding(step, "attention/max_logit/layer_02", level, 250.0, 100.0, "attention/max_logit/layer_02 is 250",
                "attention_max_logit_threshold")
    return Alert.from_finding(f, "gpt-run-7", [Action(step, "scale_lr", "LR x0.5 for 100 steps")])


def test_alert_says_what_where_value_threshold_and_action():
    a = alert()
    assert "gpt-run-7" in a.title and "step 5" in a.title
    assert "attention/max_logit/layer_02 = 250, threshold 100" in a.text and "scale_lr (LR x0.5" in a.text


def test_webhook_posts_slack_compatible_json(receiver):
    hook = WebhookAlert(url=receiver.url, timeout=2, retries=0)
    hook.send(alert())
    hook.close(timeout=5)
    assert hook.sent == 1 and len(receiver.bodies) == 1
    text = receiver.bodies[0]["text"]
    assert text.startswith("*stabmon: warning on gpt-run-7 at step 5*") and "threshold 100" in text


def test_webhook_url_from_environment(receiver, monkeypatch):
    monkeypatch.setenv("STABMON_WEBHOOK_URL", receiver.url)
    hook = WebhookAlert()
    hook.send(alert())
    hook.close(timeout=5)
    assert receiver.bodies


def test_webhook_retries_a_500_then_gives_up_quietly(caplog):
    r = Receiver(status=500)
    try:
        hook = WebhookAlert(url=r.url, timeout=2, retries=2, backoff=0.01)
        with caplog.at_level(logging.WARNING, logger="stabmon.alerts"):
            hook.send(alert())
            hook.send(alert(step=6))
            hook.close(timeout=10)
        assert len(r.bodies) == 6 and hook.failed == 2 and hook.sent == 0  # 3 attempts each
        messages = [rec.getMessage() for rec in caplog.records]
        assert sum("could not be delivered" in m for m in messages) == 1  # said once
        assert not any("SECRET-TOKEN" in m or "127.0.0.1" in m for m in messages)
    finally:
        r.close()


def test_unreachable_webhook_never_blocks_the_caller():
    import socket
    import time

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hook = WebhookAlert(url=f"http://127.0.0.1:{port}/x", timeout=0.5, retries=1, backoff=0.01)
    start = time.perf_counter()
    hook.send(alert())
    assert time.perf_counter() - start < 0.1  # queued, sent on the background thread
    hook.close(timeout=5)
    assert hook.failed == 1


def test_webhook_secret_stays_secret(receiver):
    hook = WebhookAlert(url=receiver.url)
    assert "SECRET" not in repr(hook) and "127.0.0.1" not in repr(hook)
    with pytest.raises(TypeError, match="secret"):
        pickle.dumps(hook)
    with pytest.raises(ValueError, match="STABMON_WEBHOOK_URL"):
        WebhookAlert(url="")
    with pytest.raises(ValueError, match="http:// or https://") as err:
        WebhookAlert(url="ftp://secret-host/token")
    assert "secret-host" not in str(err.value)


def test_log_alert(caplog):
    with caplog.at_level(logging.WARNING, logger="stabmon.alerts"):
        LogAlert().send(alert(level="critical"))
    assert caplog.records[0].levelno == logging.ERROR and "gpt-run-7" in caplog.records[0].getMessage()


def test_dispatcher_deduplicates_and_backs_off_a_failing_channel():
    now = [0.0]

    class Flaky(AlertChannel):
        def __init__(self):
            self.calls = 0

        def send(self, alert):
            self.calls += 1
            raise ConnectionError("down")

    flaky, ok = Flaky(), []

    class Ok(AlertChannel):
        def send(self, alert):
            ok.append(alert.step)

    d = AlertDispatcher([flaky, Ok()], dedupe_steps=10, retry_after=30, clock=lambda: now[0])
    f = lambda step, sig="a": Finding(step, sig, "warning", 2.0, 1.0, "m", "d")  # noqa: E731
    d.dispatch([f(0)], [], run="r")
    d.dispatch([f(5)], [], run="r")  # duplicate within 10 steps
    d.dispatch([f(20, "b")], [], run="r")  # flaky is resting (30 s back-off)
    now[0] = 31.0
    d.dispatch([f(40, "c")], [], run="r")  # retried after the back-off
    assert ok == [0, 20, 40] and flaky.calls == 2
    d.dispatch([Finding(50, "z", "info", 1.0, 1.0, "m", "d")], [], run="r")  # below min_level
    assert ok == [0, 20, 40]


def test_alerts_from_a_real_fit(receiver):
    hook = WebhookAlert(url=receiver.url, timeout=2)
    monitor = StabilityMonitor(alerts=[hook, LogAlert()], **FAST)
    quiet_trainer(max_steps=22, callbacks=[monitor]).fit(Faulty({20: 1000.0}), token_loader(n=400))
    assert receiver.bodies, "no alert reached the receiver"
    text = receiver.bodies[0]["text"]
    assert "step 20" in text and "skip_step" in text and "critical" in text
    assert "SECRET" not in json.dumps(monitor.state_dict())
    with pytest.raises(ValueError, match="`alerts` must hold stabmon.alerts channels"):
        StabilityMonitor(alerts=["https://hooks.example.com"])


def test_a_dead_alert_channel_does_not_stop_training():
    class Broken(AlertChannel):
        def send(self, alert):
            raise RuntimeError("W&B outage")

    monitor = StabilityMonitor(alerts=[Broken()], **FAST)
    module = Faulty({20: 1000.0})
    quiet_trainer(max_steps=24, callbacks=[monitor]).fit(module, token_loader(n=400))
    assert all(torch.isfinite(p).all() for p in module.parameters())
