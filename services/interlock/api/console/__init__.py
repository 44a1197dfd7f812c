"""The web console, served by the api service at ``/`` (pages, templates and static assets ship in the package)."""

from interlock.api.console._routes import router, static_files

__all__ = ["router", "static_files"]
