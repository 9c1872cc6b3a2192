"""plotly's widget module is installed once as a static file the Jupyter server serves, and each
figure's ``_esm`` is a loader that imports it from the URL in the page's Jupyter config.

Checked here: the installed copy (bytes, name from plotly's version and the bundle's SHA-256),
the loader's JavaScript run by Node against a stand-in module, and a real JupyterLab server
serving the file at the URL the loader builds from the page config of ``/lab``. That the
browser then evaluates plotly once for all figures is checked in a real browser
(``tests/browser/check_workbench.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("plotly")
pytest.importorskip("anywidget")

import plotly  # noqa: E402
from cryospin_lab.widgets import _plotly_module as pm  # noqa: E402
from cryospin_lab.widgets._plotly import new_figure  # noqa: E402

from cryospin_lab.engine.distributed import free_port


@pytest.fixture
def fresh_module_choice():
    pm.figure_module.cache_clear()
    yield
    pm.figure_module.cache_clear()


def test_install_copies_plotly_bundle_under_a_versioned_hashed_name(tmp_path):
    bundle = Path(plotly.__file__).parent / "package_data" / "widgetbundle.js"
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()[:12]
    stale = tmp_path / "cryospin-lab-assets" / "static" / "plotly-widget-0.0.1-000000000000.js"
    stale.parent.mkdir(parents=True)
    stale.write_text("old")

    path = pm.install(tmp_path)

    assert (
        path
        == tmp_path / "cryospin-lab-assets" / "static" / f"plotly-widget-{plotly.__version__}-{digest}.js"
    )
    assert path.read_bytes() == bundle.read_bytes()
    assert not stale.exists(), "an older plotly's bundle is removed"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "no partial file left"
    assert not (tmp_path / "cryospin-lab-assets" / "package.json").exists(), "must not look like an extension"


def test_installed_finds_the_copy_only_on_jupyters_search_path(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share"))
    monkeypatch.setattr(pm, "_search_path", lambda: [tmp_path / "share" / "labextensions"])
    assert pm.installed() is None
    path = pm.install(tmp_path / "share" / "labextensions")
    assert pm.installed() == path
    path.write_text("truncated")
    assert pm.installed() is None, "a copy of the wrong size is not served"


def test_install_names_every_folder_it_could_not_write(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OSError, match=re.escape(str(blocker / "cryospin-lab-assets" / "static"))):
        pm.install(blocker)


def test_figures_carry_the_loader_not_the_bundle(fresh_module_choice, monkeypatch):
    monkeypatch.delenv(pm.ENV_VAR, raising=False)
    fig = new_figure()
    assert len(fig._esm) < 5000
    assert json.dumps(pm.bundle_name()) in fig._esm
    assert pm.installed() is not None, "making a figure installs the bundle"
    assert fig.get_state()["_esm"] == fig._esm


def test_embedded_mode_keeps_plotlys_own_module(fresh_module_choice, monkeypatch):
    monkeypatch.setenv(pm.ENV_VAR, "embedded")
    fig = new_figure()
    assert fig._esm == pm.bundle_path().read_text(encoding="utf-8")


def test_unknown_mode_is_an_error_naming_the_variable(fresh_module_choice, monkeypatch):
    monkeypatch.setenv(pm.ENV_VAR, "cdn")
    with pytest.raises(ValueError, match="CRYOSPIN_LAB_PLOTLY_MODULE='cdn'"):
        new_figure()


NODE_HARNESS = """
const [loaderPath, config] = process.argv.slice(2);
globalThis.document = {
  baseURI: "file:///page/",
  getElementById: (id) =>
    id === "jupyter-config-data" && config !== "none" ? { textContent: config } : null,
};
try {
  const mod = await import(loaderPath);
  console.log(JSON.stringify({ ok: mod.default.marker }));
} catch (error) {
  console.log(JSON.stringify({ error: String(error.message) }));
}
"""


def run_loader(tmp_path: Path, config: str) -> dict:
    loader = tmp_path / f"loader-{abs(hash(config))}.mjs"
    loader.write_text(
        pm.LOADER % {"file": json.dumps(pm.bundle_name()), "folder": json.dumps(pm.ASSET_FOLDER)}
    )
    harness = tmp_path / "harness.mjs"
    harness.write_text(NODE_HARNESS)
    out = subprocess.run(
        ["node", str(harness), loader.as_uri(), config],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run the loader's JavaScript")
def test_loader_imports_the_module_from_the_pages_extensions_url(tmp_path):
    """The loader, run by Node against a stand-in for plotly's module at the path the server uses."""
    served = tmp_path / "ext" / pm.ASSET_FOLDER / "static" / pm.bundle_name()
    served.parent.mkdir(parents=True)
    served.write_text("export default { marker: 'stand-in' };\n")
    base = (tmp_path / "ext").as_uri()
    for url in (base, base + "/", base + "//"):
        assert run_loader(tmp_path, json.dumps({"fullLabextensionsUrl": url})) == {"ok": "stand-in"}
    missing = run_loader(tmp_path, json.dumps({"fullLabextensionsUrl": (tmp_path / "nowhere").as_uri()}))
    assert "could not import plotly's widget module" in missing["error"]
    assert "_plotly_module" in missing["error"]
    for config in ("none", "{}", "not json"):
        assert "no Jupyter page config" in run_loader(tmp_path, config)["error"]


def test_jupyterlab_serves_the_bundle_at_the_url_the_loader_builds(tmp_path):
    """A real JupyterLab: the page config of /lab gives fullLabextensionsUrl; the file is served there."""
    pytest.importorskip("jupyterlab")
    share = tmp_path / "share"
    path = pm.install(share / "labextensions")
    port = free_port()
    env = dict(os.environ, JUPYTER_PATH=str(share), JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    argv = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
            f"--port={port}", "--ServerApp.port_retries=0", "--IdentityProvider.token=",
            "--ServerApp.password=", f"--ServerApp.root_dir={tmp_path}"]  # fmt: skip
    log = (tmp_path / "lab.log").open("wb")
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/lab", timeout=5).read().decode()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("JupyterLab did not start: " + (tmp_path / "lab.log").read_text()[-2000:])
                time.sleep(0.5)
        config = re.search(r'id="jupyter-config-data"[^>]*>(.*?)</script>', page, re.S)
        extensions = json.loads(config.group(1))["fullLabextensionsUrl"]
        url = f"http://127.0.0.1:{port}{extensions.rstrip('/')}/{pm.ASSET_FOLDER}/static/{path.name}"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert "javascript" in response.headers["Content-Type"]
            assert response.read() == path.read_bytes()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
