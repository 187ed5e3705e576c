"""tau2-bench simulation results (JSON): each simulation becomes one multi-step, two-LLM program.

A simulation's ``messages`` alternate between the agent LLM (role ``assistant``), the user
simulator LLM (role ``user``) and tools (role ``tool``). Every LLM-generated message carries
``usage: {prompt_tokens, completion_tokens}``; the first assistant message (a fixed greeting) has
none and is not a call. The program is the chain of steps in message order:

- an LLM step per message with ``usage`` (agent id ``2i`` for the agent of simulation ``i``,
  ``2i+1`` for its user simulator), with the real prompt and completion token counts;
- a tool step per ``tool`` message, lasting the time since the previous message (tau2's tools are
  local functions: these are milliseconds);
- the recorded start and duration of every step from the message timestamps.

Prompts grow by the turn structure, per agent: call k's prompt is call k-1's prompt, then its
output, then ``P_k - P_{k-1} - O_{k-1}`` new tokens (the messages in between). If a prompt is
shorter than that (it never is in the sample), it is the first ``P_k`` tokens of that history.
The first prompt of each agent starts with a system prompt shared by every simulation of the
file (the domain policy and tools for the agent; the simulation guidelines for the user
simulator), of a size estimated as the smallest first prompt minus the visible text before it
(at ~4 characters per token); the rest of the first prompt is private.

Programs arrive at their simulation's ``start_time`` relative to the earliest one.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any, Iterator

from agentsim.errors import TraceError
from agentsim.traces.canonical import ProgramRecord, Step, llm_step, tool_step, truncate_pieces
from agentsim.traces.importers import Importer, open_text, register_importer

CHARS_PER_TOKEN = 4.0
SHARED_AGENT_SYSTEM = 0   # content ids of the two shared system prompts
SHARED_USER_SYSTEM = 1


def _ts(s: Any) -> float:
    if not isinstance(s, str):
        raise ValueError(f"expected an ISO timestamp string, got {s!r}")
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _tokens_of_text(*texts: Any) -> int:
    chars = sum(len(t) if isinstance(t, str) else len(json.dumps(t)) if t is not None else 0 for t in texts)
    return int(math.ceil(chars / CHARS_PER_TOKEN))


class _Bad(Exception):
    def __init__(self, path: list, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


@register_importer
class Tau2Importer(Importer):
    name = "tau2"

    def _load(self) -> tuple[dict, str]:
        with open_text(self.path) as f:
            text = f.read()
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise TraceError(self.where(e.lineno), f"malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("simulations"), list):
            raise TraceError(self.where(1), "not a tau2-bench results file (no 'simulations' list)")
        return doc, text

    def _programs(self) -> Iterator[ProgramRecord]:
        doc, text = self._load()
        tasks = {str(t.get("id")): t for t in doc.get("tasks") or [] if isinstance(t, dict)}
        info = doc.get("info") if isinstance(doc.get("info"), dict) else {}
        self.meta["domain"] = ((info.get("environment_info") or {}).get("domain_name")
                               if isinstance(info.get("environment_info"), dict) else None)
        parsed = []
        for i, sim in enumerate(doc["simulations"]):
            try:
                parsed.append((i, self._parse(sim, i)))
            except _Bad as e:
                self.bad(self.where(_locate(text, ["simulations", i] + e.path)),
                         "simulations[%d]%s: %s" % (i, "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                                                                 for p in e.path), e.message))
        if not parsed:
            return
        shared = self._shared_sizes(parsed, tasks)
        t_first = min(p["start"] for _, p in parsed)
        self.meta["shared_system_tokens"] = {"agent": shared[0], "user": shared[1]}
        next_id = [2]  # content ids 0 and 1 are the shared system prompts
        for n, (i, p) in enumerate(parsed):
            yield self._build(n, i, p, shared, t_first, next_id)

    # -- parsing (raises _Bad with a JSON path)
    def _parse(self, sim: Any, i: int) -> dict:
        if not isinstance(sim, dict):
            raise _Bad([], "expected an object")
        msgs = sim.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _Bad(["messages"], "expected a non-empty list")
        try:
            start = _ts(sim.get("start_time"))
        except ValueError as e:
            raise _Bad(["start_time"], str(e)) from None
        out = []
        tool_names: dict[str, str] = {}
        for j, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise _Bad(["messages", j], "expected an object")
            role = m.get("role")
            if role not in ("assistant", "user", "tool", "system"):
                raise _Bad(["messages", j, "role"], f"unknown role {role!r}")
            try:
                t = _ts(m.get("timestamp"))
            except ValueError as e:
                raise _Bad(["messages", j, "timestamp"], str(e)) from None
            usage = m.get("usage")
            rec: dict[str, Any] = {"role": role, "t": t, "content": m.get("content")}
            if usage is not None:
                if role not in ("assistant", "user"):
                    raise _Bad(["messages", j, "usage"], f"a {role} message cannot be an LLM call")
                if not isinstance(usage, dict):
                    raise _Bad(["messages", j, "usage"], "expected an object")
                pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
                if isinstance(pt, bool) or not isinstance(pt, int) or pt < 1:
                    raise _Bad(["messages", j, "usage", "prompt_tokens"], f"must be an integer >= 1, got {pt!r}")
                if isinstance(ct, bool) or not isinstance(ct, int) or ct < 1:
                    raise _Bad(["messages", j, "usage", "completion_tokens"], f"must be an integer >= 1, got {ct!r}")
                rec["usage"] = (pt, ct)
            calls = m.get("tool_calls")
            if isinstance(calls, list):
                for c in calls:
                    if isinstance(c, dict) and c.get("id") is not None:
                        tool_names[str(c["id"])] = str(c.get("name") or "tool")
            if role == "tool":
                rec["name"] = tool_names.get(str(m.get("id")), "tool")
            out.append(rec)
        return {"start": start, "messages": out, "task_id": str(sim.get("task_id")), "id": str(sim.get("id", i))}

    def _shared_sizes(self, parsed: list, tasks: dict) -> tuple[int, int]:
        """Estimated sizes of the agent's and the user simulator's shared system prompts."""
        agent, user = [], []
        for _, p in parsed:
            seen: list[Any] = []
            done = {"assistant": False, "user": False}
            for m in p["messages"]:
                if "usage" in m and not done[m["role"]]:
                    done[m["role"]] = True
                    if m["role"] == "assistant":
                        agent.append(m["usage"][0] - _tokens_of_text(*seen))
                    else:
                        scenario = (tasks.get(p["task_id"]) or {}).get("user_scenario")
                        user.append(m["usage"][0] - _tokens_of_text(scenario, *seen))
                seen.append(m["content"])
        return max(0, min(agent, default=0)), max(0, min(user, default=0))

    def _build(self, n: int, i: int, p: dict, shared: tuple[int, int], t_first: float, next_id: list) -> ProgramRecord:
        def fresh() -> int:
            next_id[0] += 1
            return next_id[0] - 1

        agent_of = {"assistant": 2 * n, "user": 2 * n + 1}
        system = {"assistant": (SHARED_AGENT_SYSTEM, shared[0]), "user": (SHARED_USER_SYSTEM, shared[1])}
        history: dict[str, list[tuple[int, int]]] = {}   # role -> pieces of its last prompt + output
        steps: list[Step] = []
        t_prev = p["start"]
        for m in p["messages"]:
            parents = (len(steps) - 1,) if steps else ()
            at = t_prev - p["start"]
            if "usage" in m:
                role = m["role"]
                pt, ct = m["usage"]
                prev = history.get(role)
                if prev is None:
                    sid, size = system[role]
                    size = min(size, pt)
                    pieces = [(sid, size), (fresh(), pt - size)]
                else:
                    have = sum(x for _, x in prev)
                    pieces = list(prev) + [(fresh(), pt - have)] if pt >= have else truncate_pieces(prev, pt)
                out_id = fresh()
                steps.append(llm_step(len(steps), agent_of[role], pieces, ct, parents, output_seg_id=out_id,
                                      recorded_at=at, recorded_time=max(0.0, m["t"] - t_prev)))
                history[role] = [pc for pc in pieces if pc[1] > 0] + [(out_id, ct)]
            elif m["role"] == "tool":
                steps.append(tool_step(len(steps), agent_of["assistant"], m["name"], max(0.0, m["t"] - t_prev),
                                       parents, recorded_at=at, recorded_time=max(0.0, m["t"] - t_prev)))
            t_prev = max(t_prev, m["t"])
        if not steps:
            raise TraceError(self.where(1), f"simulations[{i}] has no LLM calls or tool calls")
        return ProgramRecord(n, p["start"] - t_first, "tau2", p["id"], steps)


# --------------------------------------------------------------------------- error location
def _locate(text: str, path: list) -> int:
    """1-based line of the JSON value at ``path`` (keys and indices) in ``text``; best effort."""
    import json.decoder as jd
    import json.scanner as js

    class _D(dict):
        pos = 0

    class _L(list):
        pos = 0

    dec = json.JSONDecoder()

    def parse_object(s_and_end, *a, **k):
        obj, end = jd.JSONObject(s_and_end, *a, **k)
        d = _D(obj)
        d.pos = s_and_end[1] - 1
        return d, end

    def parse_array(s_and_end, *a, **k):
        arr, end = jd.JSONArray(s_and_end, *a, **k)
        lst = _L(arr)
        lst.pos = s_and_end[1] - 1
        return lst, end

    dec.parse_object = parse_object
    dec.parse_array = parse_array
    dec.scan_once = js.py_make_scanner(dec)
    try:
        node: Any = dec.decode(text)
    except (ValueError, RecursionError):
        return 1
    pos = getattr(node, "pos", 0)
    for key in path:
        try:
            child = node[key]
        except (KeyError, IndexError, TypeError):
            break
        if hasattr(child, "pos"):
            pos = child.pos
        elif isinstance(key, str):  # a scalar: point at its key inside the enclosing object
            found = text.find(json.dumps(key), pos)
            pos = found if found >= 0 else pos
        node = child
    return text.count("\n", 0, pos) + 1
