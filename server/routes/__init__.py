"""The HTTP routes, one router per concern: generation, OpenAI compatibility, admin, health."""

from . import admin, generate, health, openai

__all__ = ["ROUTERS"]

ROUTERS = (health.router, generate.router, openai.router, admin.router)
