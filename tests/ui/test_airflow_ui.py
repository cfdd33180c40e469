"""The Airflow UI in a real browser: `airflow standalone` on a free loopback port (its own SQLite database
in a temporary AIRFLOW_HOME, the DAGs of dags/), Debian's chromium driven headless by Playwright.

The fine-tune is triggered from its form as a person would: the DAG page, the Trigger button, the typed
form. A bad learning rate (-1) is refused (the API answers 400 and the UI says so; no run is created);
good values on the tiny recipe start a run, which the UI then shows as successful. Screenshots of each step
go to build/ui-screenshots/ (printed). The server and every process it started are ended whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import pipeline_workspace

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
BIN = Path(sys.executable).parent
CHROMIUM = Path("/usr/bin/chromium")  # Debian's; `.ci/run` installs it. Never `playwright install`.
SHOTS = ROOT / "build" / "ui-screenshots"
DAG = "eupe_domain_finetune"
RUN_TIMEOUT_S = 600  # the fine-tune on the tiny recipe: a few minutes on 2 shared cores



def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, tries: int = 3) -> tuple[int, dict]:
    """GET of the server's REST API (no login: all admins); (0, {}) when it does not answer in time."""
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, {}
        except OSError:  # refused while starting, or slow: the cores are shared with the run's tasks
            if attempt == tries - 1:
                return 0, {}
            time.sleep(2)
    return 0, {}


def stop_tree(proc: subprocess.Popen) -> list[str]:
    """SIGTERM to the server's process group and to every descendant, SIGKILL to what is left after 30 s.
    Returns the processes that needed the SIGKILL."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []

    def signal_all(sig: int, procs: list) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # the whole session (start_new_session), re-parented processes too
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)

    signal_all(signal.SIGTERM, family)
    _, alive = psutil.wait_procs(family, timeout=30)
    stubborn = []
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            stubborn.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
    if alive:
        signal_all(signal.SIGKILL, alive)
        psutil.wait_procs(alive, timeout=10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    return stubborn


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny dense dataset and the tiny recipe (as tests/components/test_local_pipeline.py makes them), and
    a base checkpoint and a proxy: the recipe's student and proxy as encoder files (the form of published models)."""
    from safetensors.torch import save_file

    from eupe.config import load_config
    from eupe.models.registry import build_model

    root = tmp_path_factory.mktemp("ui_workspace")
    config = pipeline_workspace(root)
    base = root / "base" / "encoder.safetensors"
    proxy = root / "proxy" / "encoder.safetensors"  # a fine-tune distils a given proxy, never a random one
    for path, spec in ((base, load_config(config).student), (proxy, load_config(config).proxy)):
        path.parent.mkdir()
        save_file({k: v.contiguous() for k, v in build_model(spec).state_dict().items()}, str(path))
    return root, config, base


@pytest.fixture(scope="module")
def airflow_ui(tmp_path_factory, workspace):
    """`airflow standalone` on 127.0.0.1:<free port>; yields (base URL, AIRFLOW_HOME, artifact root)."""
    root = workspace[0]
    home = tmp_path_factory.mktemp("ui_airflow_home")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_VAR_", "AIRFLOW__"))}
    env.update(
        AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(DAGS), AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",  # no login page
        AIRFLOW__API__HOST="127.0.0.1", AIRFLOW__API__PORT=str(port), AIRFLOW__API__BASE_URL=url,
        AIRFLOW__API__WORKERS="1", AIRFLOW__CORE__PARALLELISM="2",  # 2 shared cores
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),  # not 8793/8794: a `make airflow` may run
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()),
        AIRFLOW_VAR_EUPE_WORKDIR=str(ROOT), AIRFLOW_VAR_EUPE_ARTIFACT_ROOT=str(root / "artifacts"),
        AIRFLOW_VAR_EUPE_RETRY_DELAY_S="5",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1", NO_COLOR="1")
    log = home / "standalone.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "airflow"), "standalone"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:  # the API server up and the fine-tune DAG parsed
            if proc.poll() is not None:
                pytest.fail(f"airflow standalone exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            status, _ = get_json(f"{url}/api/v2/dags/{DAG}", tries=1)
            if status == 200:
                break
            if time.monotonic() > deadline:
                _, errors = get_json(f"{url}/api/v2/importErrors") if status else (0, {})
                pytest.fail(f"{DAG} not served at {url} within 240 s (last status {status}; import errors: "
                            f"{errors.get('import_errors')}):\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield url, home, root / "artifacts"
    finally:
        stubborn = stop_tree(proc)
        if stubborn:
            print(f"airflow standalone: SIGKILL after 30 s for {stubborn}")


def shoot(page, name: str, **kwargs) -> Path:
    path = SHOTS / name
    page.screenshot(path=str(path), **kwargs)
    return path


def task_log_tails(home: Path, run_id: str, states: dict[str, str]) -> str:
    out = []
    for task, state in states.items():
        if state not in ("success", "skipped"):
            task_id = task.split("[")[0]  # a mapped task's logs: task_id=<id>/map_index=<i>/attempt=<n>.log
            for f in sorted((home / "logs").glob(f"dag_id={DAG}/run_id={run_id}/task_id={task_id}/**/*.log")):
                out.append(f"--- {f.relative_to(home)} ({state})\n" + "\n".join(f.read_text().splitlines()[-25:]))
    return "\n".join(out)


def test_a_finetune_triggered_from_the_form_refuses_a_bad_lr_and_then_succeeds(airflow_ui, workspace, capsys):
    from playwright.sync_api import expect, sync_playwright

    url, home, artifacts = airflow_ui
    data_root, config, base = workspace
    assert CHROMIUM.exists(), f"{CHROMIUM} missing: `apt-get install -y chromium` (.ci/run does it)"
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    with capsys.disabled():
        print(f"\nAirflow UI test: server {url}, AIRFLOW_HOME {home}, screenshots in {SHOTS}")
    good = {"dataset_uri": str(data_root / "data"), "config": str(config), "base_checkpoint": str(base),
            "proxy": str(data_root / "proxy" / "encoder.safetensors"),
            "steps": "4", "latency_budget_ms": "60000", "model_name": "ui_domain", "run_name": "ui"}
    started = time.monotonic()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 2400})  # the whole form in one view
            page.set_default_timeout(30_000)
            page.goto(f"{url}/dags/{DAG}", wait_until="networkidle")
            expect(page.get_by_text(DAG).first).to_be_visible()
            shoot(page, "01-dag.png")

            def open_form(values: dict[str, str], paused: bool):
                """The DAG page's Trigger button: the form of the DAG's typed Params, filled with ``values``."""
                page.get_by_role("button", name="Trigger").first.click()
                dialog = page.get_by_role("dialog")
                expect(dialog.get_by_text(f"Trigger Dag - {DAG}")).to_be_visible()
                expect(dialog.get_by_text("Learning rate", exact=True)).to_be_visible()
                if paused:  # a new DAG starts paused: the form offers to unpause it, ticked
                    expect(dialog.get_by_label(f"Unpause {DAG} on trigger")).to_be_checked()
                for name, value in values.items():
                    dialog.locator(f'input[name="element_{name}"]').fill(value)
                trigger = dialog.get_by_role("button", name="Trigger")
                if not trigger.is_enabled():  # the form itself refuses the values: name the fields it wants
                    required_empty = dialog.locator("input[required]").evaluate_all(
                        "els => els.filter(e => !e.value).map(e => e.name.replace('element_', ''))")
                    shoot(page, "02-form-trigger-disabled.png")
                    pytest.fail(f"the trigger form keeps Trigger disabled with good values: fields it marks "
                                f"required are empty: {required_empty} (an optional string Param needs type "
                                f"['null', 'string'] to be optional in the Airflow 3 form); screenshots in {SHOTS}")
                return dialog, trigger

            def submit(trigger):
                with page.expect_response(lambda r: r.request.method == "POST"
                                          and r.url.endswith(f"/api/v2/dags/{DAG}/dagRuns")) as response:
                    trigger.click()
                return response.value

            # A bad learning rate: the form sends it, the API refuses it (400) and the form shows why; no run.
            dialog, trigger = open_form({**good, "lr": "-1"}, paused=True)
            refused = submit(trigger)
            assert refused.status == 400, refused.text()
            expect(dialog.get_by_text("Invalid input for param lr: -1 is less than or equal to the minimum of 0")
                   ).to_be_visible()
            expect(page.get_by_text("Failed to Trigger Dag")).to_be_visible()
            shoot(page, "03-bad-lr-refused.png")
            assert get_json(f"{url}/api/v2/dags/{DAG}/dagRuns")[1].get("total_entries") == 0
            page.keyboard.press("Escape")
            expect(dialog).to_be_hidden()
            page.mouse.move(1, 1)  # a hovered toast stays; it would cover the form's Trigger button
            expect(page.get_by_text("Failed to Trigger Dag")).to_be_hidden(timeout=60_000)

            # Good values in a new form (02-form.png), then Trigger. The page is reloaded first: a form opened
            # again on the same page still shows the last refusal.
            page.reload(wait_until="networkidle")
            dialog, trigger = open_form({**good, "lr": "0.001"}, paused=False)  # the Trigger click unpaused it
            dialog.screenshot(path=str(SHOTS / "02-form.png"))
            accepted = submit(trigger)
            assert accepted.status == 200, accepted.text()
            run = accepted.json()
            run_id = run["dag_run_id"]
            assert run["conf"]["lr"] == 0.001 and run["conf"]["steps"] == 4 and run["conf"]["stages"] == "3"
            expect(dialog).to_be_hidden()
            page.set_viewport_size({"width": 1280, "height": 1000})

            # Until the run ends (the REST API of the same server), then the UI's page of the run.
            state, deadline = run["state"], time.monotonic() + RUN_TIMEOUT_S
            while state not in ("success", "failed") and time.monotonic() < deadline:
                time.sleep(5)
                state = get_json(f"{url}/api/v2/dags/{DAG}/dagRuns/{run_id}")[1].get("state", state)
            page.goto(f"{url}/dags/{DAG}/runs/{run_id}", wait_until="networkidle")
            tis = get_json(f"{url}/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances")[1].get("task_instances", [])
            states = {t["task_id"] + (f"[{t['map_index']}]" if t["map_index"] >= 0 else ""): t["state"]
                      for t in tis}
            if state != "success":
                shoot(page, "04-run-not-successful.png")
            assert state == "success", (f"run {run_id}: {state} after {time.monotonic() - started:.0f} s; tasks "
                                        f"{states}\n{task_log_tails(home, run_id, states)}")
            expect(page.get_by_text(run_id).first).to_be_visible()
            expect(page.get_by_text("Success").first).to_be_visible()  # the run's badge, and its tasks'
            shoot(page, "04-success.png")
        finally:
            browser.close()

    assert set(states.values()) <= {"success", "skipped"}, states
    assert states["train_stage2"] == "skipped" and states["train_stage3"] == "success"  # stages = 3
    pointer = json.loads((artifacts / "models" / "ui_domain" / "production.json").read_text())
    assert pointer["version"] == 1 and pointer["run_id"] == "ui"
    with capsys.disabled():
        print(f"Airflow UI test: run {run_id} success in {time.monotonic() - started:.0f} s; screenshots "
              f"{sorted(p.name for p in SHOTS.glob('*.png'))}")
