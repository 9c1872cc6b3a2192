"""plotly's front-end widget module, evaluated once per page instead of once per figure.

The problem (plotly 7.1 + anywidget 0.11): a ``FigureWidget``'s front-end code is
the text of ``plotly/package_data/widgetbundle.js`` (5 MB), sent as the ``_esm``
trait of *every* figure. anywidget imports a module given as text from a fresh
``blob:`` URL per widget model, so the browser parses and evaluates plotly.js
again for each figure, which makes every figure slow to draw
(docs/decisions.md#plotly-module-once).

The fix: the bundle is installed once as a static file in a folder the Jupyter
server already serves (``share/jupyter/labextensions/cryospin-lab-assets/static/``:
JupyterLab and Notebook 7 serve it under ``<base>/lab/extensions/``, Voila under
``<base>/voila/labextensions/``; a folder without ``package.json`` is served but
is not loaded as an extension). Each figure's ``_esm`` becomes a small loader
(:data:`LOADER`) that reads that URL from the page's Jupyter config and imports
it. The browser keeps one module per URL, so the bundle is evaluated once per
page, on first draw, after a reload and in Voila alike (no widget depends on
another having loaded first). The file name carries plotly's version and the
bundle's hash, so a plotly upgrade never meets a stale file.

:func:`install` writes the file (``python -m cryospin_lab.widgets._plotly_module``;
``make install`` and ``binder/postBuild`` run it; the first figure made in a
kernel runs it too). ``CRYOSPIN_LAB_PLOTLY_MODULE`` defaults to ``shared``
(this loader). Where the file cannot be written, or with
``CRYOSPIN_LAB_PLOTLY_MODULE=embedded`` (front ends without a Jupyter page
config, e.g. VS Code), figures carry plotly's own module: slower, and said so
in a warning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import plotly

__all__ = ["ASSET_FOLDER", "bundle_path", "bundle_name", "install", "installed", "figure_module"]

ASSET_FOLDER = "cryospin-lab-assets"
ENV_VAR = "CRYOSPIN_LAB_PLOTLY_MODULE"

LOADER = """\
// cryospin-lab: plotly's FigureWidget module, imported once per page from the Jupyter server.
const FILE = %(file)s;
const FOLDER = %(folder)s;
function extensionsUrl() {
  const node = document.getElementById("jupyter-config-data");
  let url = null;
  try { url = node ? JSON.parse(node.textContent).fullLabextensionsUrl : null; } catch (e) {}
  if (!url) {
    throw new Error("cryospin-lab: this page has no Jupyter page config (fullLabextensionsUrl), so " +
      "plotly's widget module cannot be found; set CRYOSPIN_LAB_PLOTLY_MODULE=embedded in the kernel.");
  }
  return url;
}
const base = extensionsUrl().replace(/\\/+$/, "");
const url = new URL(`${base}/${FOLDER}/static/${FILE}`, document.baseURI).href;
let plotlyModule;
try {
  plotlyModule = await import(url);
} catch (error) {
  throw new Error(`cryospin-lab: could not import plotly's widget module from ${url} (${error}). ` +
    "Run `python -m cryospin_lab.widgets._plotly_module` in the Jupyter server's environment, " +
    "or set CRYOSPIN_LAB_PLOTLY_MODULE=embedded in the kernel.");
}
export default plotlyModule.default;
"""


def bundle_path() -> Path:
    """plotly's widget bundle, as installed with plotly."""
    return Path(plotly.__file__).parent / "package_data" / "widgetbundle.js"


@functools.cache
def bundle_name() -> str:
    """The served file's name: plotly's version and the first 12 hex digits of the bundle's SHA-256."""
    digest = hashlib.sha256(bundle_path().read_bytes()).hexdigest()[:12]
    return f"plotly-widget-{plotly.__version__}-{digest}.js"


def _search_path() -> list[Path]:
    """The folders the Jupyter server looks in for ``labextensions`` (``jupyter_path``), first wins."""
    from jupyter_core.paths import jupyter_path

    return [Path(p) for p in jupyter_path("labextensions")]


def installed() -> Path | None:
    """The installed copy of the bundle the server would serve, if any (same name, same size)."""
    size = bundle_path().stat().st_size
    for root in _search_path():
        candidate = root / ASSET_FOLDER / "static" / bundle_name()
        if candidate.is_file() and candidate.stat().st_size == size:
            return candidate
    return None


def install(root: Path | None = None) -> Path:
    """Copy plotly's bundle to ``<root>/cryospin-lab-assets/static/<bundle_name()>`` and return that path.

    ``root`` defaults to this environment's ``share/jupyter/labextensions`` (what a server running
    from the same environment serves), then the user's Jupyter data folder. The file is written
    under a temporary name and renamed, so a server never serves half a file. Older bundles in the
    folder are removed. Raises ``OSError`` naming every folder tried when none is writable.
    """
    from jupyter_core.paths import jupyter_data_dir

    roots = [root] if root is not None else [Path(sys.prefix) / "share/jupyter/labextensions"]
    if root is None:
        roots.append(Path(jupyter_data_dir()) / "labextensions")
    data = bundle_path().read_bytes()
    errors = []
    for base in roots:
        folder = base / ASSET_FOLDER / "static"
        target = folder / bundle_name()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not (target.is_file() and target.stat().st_size == len(data)):
                partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
                partial.write_bytes(data)
                partial.replace(target)
            for old in folder.glob("plotly-widget-*.js"):
                if old != target:
                    old.unlink(missing_ok=True)
            return target
        except OSError as error:
            errors.append(f"{folder}: {error}")
    raise OSError("cannot install plotly's widget module for the browser; tried " + "; ".join(errors))


@functools.cache
def figure_module() -> str | None:
    """The ``_esm`` text for a figure: the loader, with the bundle installed (installing it if
    needed); ``None`` (use plotly's own module) when ``CRYOSPIN_LAB_PLOTLY_MODULE=embedded`` or
    when it cannot be installed (with a warning)."""
    mode = os.environ.get(ENV_VAR, "shared").strip().lower()
    if mode == "embedded":
        return None
    if mode != "shared":
        raise ValueError(f"{ENV_VAR}={mode!r}: expected 'shared' (default) or 'embedded'")
    if installed() is None:
        try:
            install()
        except OSError as error:
            warnings.warn(
                f"{error}. Each figure carries plotly's 5 MB module instead (slow to draw).", stacklevel=3
            )
            return None
    return LOADER % {"file": json.dumps(bundle_name()), "folder": json.dumps(ASSET_FOLDER)}


def main() -> None:
    path = install()
    print(f"plotly's widget module for the browser: {path}")


if __name__ == "__main__":
    main()
