"""The HTTP routes, one router per concern: generation, OpenAI compatibility, admin, health and the workbench
(sweeps, computed vectors, norms)."""

from . import admin, generate, health, openai, workbench

__all__ = ["ROUTERS"]

ROUTERS = (
    health.router,
    generate.router,
    openai.router,
    workbench.router,
    admin.router,
)
