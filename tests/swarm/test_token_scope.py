"""The cluster token goes to the cluster's own hosts only, never to a peer or tracker that a
manifest's author merely named (a Kubernetes CR author cannot read the Secret, and must not be able
to have the sidecar send it to a URL they chose)."""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from support.servers import ThreadServer

from tightwad.swarm.client import SwarmClient


def recorder(seen: list[str | None]) -> Starlette:
    async def anything(request: Request) -> JSONResponse:
        seen.append(request.headers.get("authorization"))
        return JSONResponse({"files": []})

    return Starlette(routes=[Route("/{path:path}", anything)])


def ask(client: SwarmClient, *peers: str) -> None:
    async def run() -> None:
        async with client:
            for peer in peers:
                await client.files(peer)

    asyncio.run(run())


def test_the_token_reaches_the_clusters_hosts_and_no_one_else() -> None:
    own: list[str | None] = []
    foreign: list[str | None] = []
    with ThreadServer(recorder(own)) as ours, ThreadServer(recorder(foreign)) as theirs:
        # Both listen on loopback; the foreign one is reached by another name, as an outside peer would be.
        foreign_url = theirs.url.replace("127.0.0.1", "localhost")
        ask(SwarmClient("cluster-secret", token_hosts=frozenset({"127.0.0.1"})), ours.url, foreign_url)
    assert own == ["Bearer cluster-secret"]
    assert foreign == [None]


def test_a_user_naming_peers_by_hand_sends_the_token_to_them() -> None:
    seen: list[str | None] = []
    with ThreadServer(recorder(seen)) as peer:
        ask(SwarmClient("my-token"), peer.url.replace("127.0.0.1", "localhost"))
    assert seen == ["Bearer my-token"]
