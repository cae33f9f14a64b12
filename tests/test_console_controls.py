"""The console's controls over plain HTTP: pause and resume both work without a body, as a
script's ``curl -X POST`` sends them; a body still sets the reason and is checked."""

from __future__ import annotations

from fastapi.testclient import TestClient
from front_door_fakes import FakeEngine

from bridge_http.app import create_app
from bridge_http.bridge import BridgeSettings


def test_pause_and_resume_take_no_body_and_pause_keeps_its_reason() -> None:
    engine = FakeEngine()
    auth = {"Authorization": "Bearer k"}
    with TestClient(create_app(engine, BridgeSettings(api_key="k"))) as client:  # type: ignore[arg-type]
        assert client.post("/console/pause").status_code == 401, "behind the key like every action"
        paused = client.post("/console/pause", headers=auth)
        assert paused.status_code == 200, paused.text
        assert paused.json() == {"ok": True, "state": "paused"} and engine.paused == "paused from the console"
        resumed = client.post("/console/resume", headers=auth)
        assert resumed.status_code == 200 and resumed.json()["state"] == "idle" and engine.paused is None
        assert client.post("/console/pause", headers=auth, json={"reason": "cleaning"}).status_code == 200
        assert engine.paused == "cleaning"
        bad = client.post("/console/pause", headers=auth, json={"reason": ""})
        assert bad.status_code == 400 and "reason" in bad.text, bad.text
        assert client.post("/console/resume", headers=auth).status_code == 200
