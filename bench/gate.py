"""The quality gate with real small models on questions with known answers, one run.

Agents: llama-server with SmolLM2-135M Q4_1, asked at a high temperature (`--agent-temperature`,
default 1.0) so it is sometimes wrong on purpose. Reviewer: llama-server with SmolLM2-135M F32 (the
strongest model available offline here, which is NOT strong: label the figures accordingly), its
verdicts constrained to the verdict JSON schema (`response_format`), so every verdict is readable.
It prints the gate's approve/correct/reject counts and the end accuracy through the gate vs the
agents alone (the same agent answers the gate judged: the gate's first call to an agent per
question), plus the reviewer alone for reference. An answer is right when it contains the known
answer (case-insensitive).

Usage: .venv/bin/python bench/gate.py [--agent-temperature 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import httpx
from _common import Processes, log_folder, table
from rich.console import Console

from tightwad import models, toolchain
from tightwad.launch import free_port, llama_server_command
from tightwad.proxy.gate import VERDICT_SCHEMA, Endpoint, Gate

QUESTIONS = {
    "What is the capital of France? Answer in one word.": "paris",
    "What is the capital of Japan? Answer in one word.": "tokyo",
    "What is the capital of Italy? Answer in one word.": "rome",
    "What is 2 + 2? Answer with a number.": "4",
    "What is 10 + 5? Answer with a number.": "15",
    "How many days are in a week? Answer with a number.": "7",
    "What color is the sky on a clear day? Answer in one word.": "blue",
    "What is the largest planet in the solar system? Answer in one word.": "jupiter",
    "What do bees make? Answer in one word.": "honey",
    "How many legs does a spider have? Answer with a number.": "8",
    "What is the opposite of hot? Answer in one word.": "cold",
    "What is frozen water called? Answer in one word.": "ice",
}
console = Console(width=120)


def right(text: str, answer: str) -> bool:
    return answer in text.lower()


async def run(agent_url: str, reviewer_url: str, temperature: float) -> int:
    recorded: list[tuple[str, str]] = []  # (question, agent answer) as the gate saw them

    agent = Endpoint("smollm-q4-hot", agent_url, overrides={"temperature": temperature})
    reviewer = Endpoint("smollm-f32", reviewer_url)
    review = {"response_format": {"type": "json_object", "schema": VERDICT_SCHEMA}, "max_tokens": 160}
    gate = Gate([agent], reviewer, fail_closed=True, cache_size=0, review_params=review)
    original = gate._chat

    async def spy(endpoint, messages, params):  # type: ignore[no-untyped-def]
        text = await original(endpoint, messages, params)
        if endpoint is agent:
            recorded.append((messages[-1]["content"], text))
        return text

    gate._chat = spy  # type: ignore[method-assign]
    through_gate = 0
    reviewer_alone = 0
    async with httpx.AsyncClient(timeout=300) as client:
        for question, answer in QUESTIONS.items():
            params = {"temperature": 0, "max_tokens": 24}  # the agent's own override makes it hot
            result = await gate.answer([{"role": "user", "content": question}], params)
            through_gate += right(result.text, answer)
            body = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 24}
            r = await client.post(f"{reviewer_url}/v1/chat/completions", json=body)
            reviewer_alone += right(r.json()["choices"][0]["message"]["content"], answer)
            console.print(f"{result.verdict:>8}  {question[:50]!r:55} -> {result.text.strip()[:40]!r}")
    agents_alone = sum(right(text, QUESTIONS[q]) for q, text in recorded if q in QUESTIONS)
    stats = gate.snapshot()
    await gate.close()
    n = len(QUESTIONS)
    a = stats["agents"]["smollm-q4-hot"]
    rows = [
        (f"agent alone (T={temperature})", "", "", "", f"{agents_alone}/{n}"),
        ("through the gate", str(a["approve"]), str(a["correct"]), str(a["reject"]), f"{through_gate}/{n}"),
        ("reviewer alone (T=0)", "", "", "", f"{reviewer_alone}/{n}"),
    ]
    title = f"quality gate, {n} questions with known answers (SmolLM2-135M agent AND reviewer)"
    console.print(table(title, ("", "approve", "correct", "reject", "accuracy"), rows, justify="right"))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agent-temperature", type=float, default=1.0)
    args = parser.parse_args()
    tc = toolchain.find()
    with Processes(log_folder("gate")) as procs:
        urls = []
        for name, model in (("agent", "smollm2-135m-q4_1"), ("reviewer", "smollm2-135m-f32")):
            port = free_port()
            cmd = llama_server_command(tc, models.resolve(model), port, threads=1)
            urls.append(procs.http(name, cmd, f"http://127.0.0.1:{port}", timeout=120))
        return asyncio.run(run(urls[0], urls[1], args.agent_temperature))


if __name__ == "__main__":
    sys.exit(main())
