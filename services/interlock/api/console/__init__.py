"""The web console, served by the api service at ``/``: server-rendered pages (Jinja2), a DAG
drawn as SVG on the server, and a little vanilla JS for live refresh; templates and static
assets ship in the package (nothing is fetched from elsewhere at run time)."""

from interlock.api.console._routes import router as console_router

__all__ = ["console_router"]
