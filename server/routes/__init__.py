"""The HTTP routes, one router per concern: generation, OpenAI compatibility, admin, health, the workbench
(sweeps, computed vectors, norms) and the playground page."""

from . import admin, generate, health, openai, playground, workbench

__all__ = ["ROUTERS"]

ROUTERS = (
    health.router,
    generate.router,
    openai.router,
    workbench.router,
    admin.router,
    playground.router,
)
