"""The api service: Interlock's HTTP API (FastAPI on uvicorn) and the web console's mount point.

Stateless: any number of copies may run behind a load balancer. It talks to the other services
only over NATS, through :class:`interlock.client.Client` (one connection per copy, with the
``api`` service credential), and acts for the caller's API key: the key's tenant, role and
principal (see :mod:`interlock.api.access`).
"""
