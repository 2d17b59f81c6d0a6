"""The web console: runs list, run page (graph, timeline, steps, audit) and the buttons
that steer a run, served by `cadenza dev --http-port` and by the operator
(CADENZA_CONSOLE_PORT).

Server-driven on purpose: every page is HTML rendered by the server from the same
`RunView` the CLI prints (engine/view.py), the graph and the timeline are inline SVG
laid out on the server (`layout`), actions are plain HTML forms answered by the engine's
control path, and the live parts are fragments a 25-line script (static/console.js)
fetches again every 1.5 s. A single-page app would need a JSON API of its own, a second
copy of what phases and timings mean, and a JavaScript build; what the console shows is
tables, two pictures and a few forms, which HTML does by itself. Nothing is fetched from
a CDN: the stylesheet and the script ship in the package (static/), so the console works
air-gapped.
"""

from .access import UNVERIFIED, Authorizer, Identity, Permission
from .app import Console, serve

__all__ = ["UNVERIFIED", "Authorizer", "Console", "Identity", "Permission", "serve"]
