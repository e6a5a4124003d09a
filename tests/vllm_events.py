"""vLLM's own KV-event publisher and codec, driven from a test through a subprocess.

Importing vLLM costs ~13 s, so one helper process per test module hosts any number of
``vllm.distributed.kv_events.ZmqEventPublisher`` instances (opened, closed and reopened on
the same port: on the wire that is an engine restart) and answers codec questions with
vLLM's msgspec classes. Protocol: one JSON command per stdin line, one JSON answer per
stdout line.

    python -m tests.vllm_events
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from tests.processes import REPO, free_port

# -- the test side ------------------------------------------------------------------------


@dataclass
class VllmEvents:
    proc: subprocess.Popen

    def ask(self, **cmd) -> dict:
        assert self.proc.poll() is None, "the vLLM events helper exited"
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the vLLM events helper died"
        answer = json.loads(line)
        assert "error" not in answer, answer["error"]
        return answer

    def open(self, name: str, replay: bool = True, topic: str = "") -> tuple[str, str | None]:
        """A publisher as an engine binds it; returns the endpoints the service dials."""
        port, rport = free_port(), free_port()
        self.ask(op="open", name=name, port=port, replay_port=rport if replay else None,
                 topic=topic)  # fmt: skip
        return f"tcp://127.0.0.1:{port}", (f"tcp://127.0.0.1:{rport}" if replay else None)

    def reopen(self, name: str) -> None:
        """Close and bind again on the same ports: what a restarted engine looks like."""
        self.ask(op="reopen", name=name)

    def stored(
        self,
        name: str,
        hashes: list[bytes],
        tokens: list[int],
        block_size: int,
        parent: bytes | None = None,
        **extra,
    ) -> None:
        event = {"type": "stored", "hashes": [h.hex() for h in hashes], "tokens": tokens}
        event |= {"block_size": block_size, "parent": parent.hex() if parent else None, **extra}
        self.ask(op="publish", name=name, events=[event])

    def removed(self, name: str, hashes: list[bytes]) -> None:
        event = {"type": "removed", "hashes": [h.hex() for h in hashes]}
        self.ask(op="publish", name=name, events=[event])

    def cleared(self, name: str) -> None:
        self.ask(op="publish", name=name, events=[{"type": "cleared"}])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_vllm_events() -> VllmEvents:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.vllm_events"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    helper = VllmEvents(proc)
    helper.ask(op="ping")
    return helper


# -- the helper process -------------------------------------------------------------------


def _events(docs: list[dict]) -> list:
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

    out = []
    for d in docs:
        if d["type"] == "stored":
            out.append(
                BlockStored(
                    block_hashes=[bytes.fromhex(h) for h in d["hashes"]],
                    parent_block_hash=bytes.fromhex(d["parent"]) if d["parent"] else None,
                    token_ids=d["tokens"],
                    block_size=d["block_size"],
                    lora_id=d.get("lora_id"),
                    medium=d.get("medium", "GPU"),
                    lora_name=d.get("lora_name"),
                    extra_keys=d.get("extra_keys"),
                )
            )
        elif d["type"] == "removed":
            out.append(BlockRemoved(block_hashes=[bytes.fromhex(h) for h in d["hashes"]],
                                    medium=d.get("medium", "GPU")))  # fmt: skip
        else:
            out.append(AllBlocksCleared())
    return out


def _serve() -> None:
    import time

    import msgspec
    from vllm.distributed.kv_events import KVEventBatch, ZmqEventPublisher

    pubs: dict[str, ZmqEventPublisher] = {}
    where: dict[str, tuple[int, int | None, str]] = {}

    def open_pub(name: str) -> None:
        port, rport, topic = where[name]
        replay = f"tcp://*:{rport}" if rport else None
        pubs[name] = ZmqEventPublisher(0, f"tcp://*:{port}", replay, topic=topic)

    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            op = cmd["op"]
            answer: dict = {"ok": True}
            if op == "open":
                where[cmd["name"]] = (cmd["port"], cmd["replay_port"], cmd.get("topic", ""))
                open_pub(cmd["name"])
            elif op == "reopen":
                pubs.pop(cmd["name"]).shutdown()
                time.sleep(0.2)  # the old sockets' ports are free again
                open_pub(cmd["name"])
            elif op == "close":
                pubs.pop(cmd["name"]).shutdown()
            elif op == "publish":
                pubs[cmd["name"]].publish(
                    KVEventBatch(ts=time.time(), events=_events(cmd["events"]))
                )
                pubs[cmd["name"]]._event_queue.join()  # sent (or lost) before we answer
            elif op == "lose_next":
                pub = pubs[cmd["name"]]
                send = pub._pub.send_multipart

                def lose_once(frames, *a, _send=send, _pub=pub, **kw):
                    _pub._pub.send_multipart = _send  # the buffer still keeps it: replayable
                    return None

                pub._pub.send_multipart = lose_once
            elif op == "encode":
                batch = KVEventBatch(ts=cmd["ts"], events=_events(cmd["events"]))
                answer["payload"] = msgspec.msgpack.encode(batch).hex()
            elif op == "decode":
                batch = msgspec.msgpack.decode(bytes.fromhex(cmd["payload"]), type=KVEventBatch)
                answer["batch"] = json.loads(msgspec.json.encode(batch))
            answer["name"] = cmd.get("name")
        except Exception as e:  # answered, so the test sees vLLM's own complaint
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)
    for pub in pubs.values():
        pub.shutdown()


if __name__ == "__main__":
    _serve()
