"""The post-training domains (`dsv4.tasks`): verifiable problems, checked by code.

Each problem's prompt is one user message in the V4 chat encoding (non-think, think or
think-max; a think-mode domain such as expr is always asked in think mode); the reply's content
(reasoning excluded) goes to `domain.check(problem, content)`. That is what
`dsv4.posttrain.common.domain_accuracy` does for a local model (greedy, same encoding), and what
an endpoint gets as a chat completion, so local and endpoint results are comparable item by
item.
"""

from __future__ import annotations

from typing import Any

from dsv4.evaluate.backends import EvalError


def available_domains(module_file: str | None = None) -> dict[str, Any]:
    """name -> Domain (the built-ins, plus those a --domain-module file defines), or EvalError
    when the post-training module is not installed."""
    try:
        from dsv4 import tasks
    except ImportError as err:
        raise EvalError(f"the tasks suite needs dsv4.tasks, which is not available "
                        f"({err})") from None
    if module_file:
        try:
            tasks.load_domain_module(module_file)
        except ValueError as err:
            raise EvalError(str(err)) from None
    return dict(tasks.DOMAINS)


def select_domains(domains: dict[str, Any], names: str | None) -> list[Any]:
    if not names:
        return [domains[n] for n in sorted(domains)]
    chosen = []
    for name in names.split(","):
        name = name.strip()
        if name not in domains:
            raise EvalError(f"--domains: unknown domain {name!r} (known: "
                            f"{', '.join(sorted(domains)) or 'none'})")
        chosen.append(domains[name])
    return chosen


def domain_problems(domain, n: int | None) -> list:
    """The domain's fixed evaluation set (its default size, or n problems)."""
    return list(domain.eval_set() if n is None else domain.eval_set(n))


def score_items(backend, items: list[tuple[str, Any, Any]], think: str, max_tokens: int
                ) -> list[dict]:
    """items: (key, domain, problem). A think-mode domain (`domain.thinking`, e.g. expr) is
    asked in think mode even when `think` is "none", as `domain_accuracy` does."""
    from dsv4.tasks import THINK_EFFORT

    modes = [think if think != "none" or not domain.thinking else THINK_EFFORT
             for _, domain, _ in items]
    replies: list[Any] = [None] * len(items)
    for mode in sorted(set(modes)):
        picked = [i for i, m in enumerate(modes) if m == mode]
        convs = [[{"role": "user", "content": items[i][2].prompt}] for i in picked]
        for i, reply in zip(picked, backend.chat(convs, mode, max_tokens)):
            replies[i] = reply
    records = []
    for (key, domain, problem), reply in zip(items, replies):
        records.append({"key": key, "domain": domain.name, "answer": problem.answer,
                        "reply": reply["content"],
                        "correct": bool(domain.check(problem, reply["content"]))})
    return records


def summarize(records: list[dict]) -> dict:
    domains: dict[str, list[bool]] = {}
    for r in records:
        domains.setdefault(r["domain"], []).append(r["correct"])
    return {"items": len(records),
            "accuracy": sum(r["correct"] for r in records) / len(records) if records else None,
            "by_domain": {d: sum(v) / len(v) for d, v in sorted(domains.items())}}
