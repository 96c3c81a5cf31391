"""The providers for models Loupe can't (or won't) run itself: fal.ai and an OpenAI-compatible gateway."""
from __future__ import annotations

import httpx

from server.catalog import ModelEntry
from server.config import Settings
from server.outbound import Outbound
from server.remote.base import Provider, RemoteImage, RemoteResult
from server.remote.fal import FalProvider
from server.remote.gateway import GatewayProvider

__all__ = ["Provider", "RemoteImage", "RemoteProviders", "RemoteResult"]


class RemoteProviders:
    """The configured providers, in order of preference: fal.ai (needs LOUPE_FAL_KEY), then the gateway
    (needs LOUPE_GATEWAY_URL)."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient | None = None) -> None:
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(follow_redirects=False, trust_env=False)
        policy = Outbound.of(settings, trust_providers=True)
        self._providers: list[Provider] = []
        if settings.fal_key:
            self._providers.append(FalProvider(settings, self._http, policy))
        if settings.gateway_url:
            self._providers.append(GatewayProvider(settings, self._http, policy))

    def route(self, entry: ModelEntry | None, model_id: str) -> Provider | None:
        """The provider for this model: the first that serves it and whose breaker lets calls through, else the
        first that serves it (which then answers 503 at once), else None."""
        serving = [provider for provider in self._providers if provider.serves(entry, model_id)]
        return next((provider for provider in serving if provider.available()), serving[0] if serving else None)

    async def aclose(self) -> None:
        for provider in self._providers:
            await provider.aclose()
        if self._owns_http:
            await self._http.aclose()
