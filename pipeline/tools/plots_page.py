"""`python -m pipeline.tools.plots_page`: writes the page template `dvc plots show` fills
(``pipeline.paths.PLOTS_PAGE``; `.dvc/config`'s ``plots.html_template``), with Vega, Vega-Lite and
Vega-Embed inside it, from the vl-convert-python package, so the page draws its charts offline.
DVC's own page loads them from a CDN. `make setup` runs it whenever it builds the venv.

DVC writes each chart as a classic inline script calling ``vegaEmbed('#id', spec)`` as the page
is parsed; the bundle is an ES module, which runs after them. So a classic script first queues
those calls, and the module replays them once the libraries are loaded.
"""

import vl_convert

from pipeline.paths import PLOTS_PAGE

# DVC's plot templates are Vega-Lite v5 specs (dvc_render's vega_templates.py).
VEGA_LITE_MAJOR = "5"
QUEUE = "window.vegaEmbed = (...call) => (window.vegaEmbed.queued ??= []).push(call);"
REPLAY = """
const queued = window.vegaEmbed.queued ?? [];
window.vegaEmbed = vegaEmbed;
for (const [element, spec, options] of queued) vegaEmbed(element, spec, options);
"""
# {plot_divs} and {refresh_tag} are DVC's placeholders; DVC's {scripts} (the CDN tags) is left out.
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <script>QUEUE</script>
    <script type="module">BUNDLE</script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def vega_lite_version() -> str:
    """The newest Vega-Lite of DVC's major version that vl-convert bundles, e.g. ``5.21``."""
    versions = [v for v in vl_convert.get_vegalite_versions() if v.split(".")[0] == VEGA_LITE_MAJOR]
    return max(versions, key=lambda v: tuple(map(int, v.split("."))))


def render() -> str:
    bundle = vl_convert.javascript_bundle(REPLAY, vl_version=vega_lite_version())
    return PAGE.replace("QUEUE", QUEUE).replace("BUNDLE", bundle.replace("</script", "<\\/script"))


def main() -> None:
    PLOTS_PAGE.parent.mkdir(parents=True, exist_ok=True)
    PLOTS_PAGE.write_text(render(), encoding="utf-8")
    print(
        f"wrote {PLOTS_PAGE}: dvc plots show's page, with Vega {vl_convert.get_vega_version()}, "
        f"Vega-Lite {vega_lite_version()} and Vega-Embed {vl_convert.get_vega_embed_version()} inside"
    )


if __name__ == "__main__":
    main()
