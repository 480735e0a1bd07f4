"""Inspection helpers without the ``ros2`` CLI: record what arrives on topics (echo/hz).

Used by the tests and by the out-of-process checker (``python -m vggt4d_ros.ros.probe``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import threading
import time
from collections import defaultdict
from typing import Any, Callable

import rclpy
from rclpy.node import Node
from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy


def qos_for(reliable: bool = True, transient_local: bool = False, depth: int = 50) -> QoSProfile:
    """A subscription QoS: reliable (or best effort), volatile (or transient-local)."""
    return QoSProfile(
        depth=depth,
        reliability=QoSReliabilityPolicy.RELIABLE if reliable else QoSReliabilityPolicy.BEST_EFFORT,
        durability=(QoSDurabilityPolicy.TRANSIENT_LOCAL if transient_local
                    else QoSDurabilityPolicy.VOLATILE))


def import_type(name: str) -> type:
    """``"sensor_msgs/msg/Image"`` (or ``sensor_msgs/Image``) → the rclpy message class."""
    parts = name.split("/")
    pkg, typ = parts[0], parts[-1]
    return getattr(importlib.import_module(f"{pkg}.msg"), typ)


class TopicProbe(Node):
    """Subscribes to topics and keeps every message (thread-safe), for checks after the fact."""

    def __init__(self, name: str = "vggt4d_probe", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self._lock = threading.Lock()
        self.messages: dict[str, list[Any]] = defaultdict(list)
        self._subs = []

    def watch(self, topic: str, msg_type: type, qos: QoSProfile | None = None) -> None:
        """Record every message on ``topic`` (reliable volatile QoS unless given)."""
        def cb(msg: Any, topic: str = topic) -> None:
            with self._lock:
                self.messages[topic].append(msg)
        self._subs.append(self.create_subscription(msg_type, topic, cb, qos or qos_for()))

    def get(self, topic: str) -> list[Any]:
        """A copy of the messages received on ``topic`` so far."""
        with self._lock:
            return list(self.messages.get(topic, []))

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {k: len(v) for k, v in self.messages.items()}


class ThreadSpinner:
    """A ``MultiThreadedExecutor`` of ``context`` spinning ``nodes`` in a daemon thread.

    ``close()`` stops the executor, destroys the nodes, shuts the context down and joins the
    thread (the teardown every caller needs, in that order).
    """

    def __init__(self, context: Any, *nodes: Node, num_threads: int = 4) -> None:
        from rclpy.executors import MultiThreadedExecutor
        self.context, self.nodes = context, nodes
        self.executor = MultiThreadedExecutor(num_threads=num_threads, context=context)
        for node in nodes:
            self.executor.add_node(node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self, join_timeout_s: float = 10.0) -> None:
        self.executor.shutdown()
        for node in self.nodes:
            node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self.thread.join(timeout=join_timeout_s)


def spin_until(executor, predicate: Callable[[], bool], timeout_s: float,
               step_s: float = 0.05) -> bool:
    """Spin ``executor`` until ``predicate()`` holds or ``timeout_s`` (wall clock) passes.

    Returns whether the predicate held. The timeout is a safety net, not a measurement.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        executor.spin_once(timeout_sec=step_s)
    return predicate()


def _main(argv: list[str] | None = None) -> int:
    """Out-of-process checker: record topics for a while, print a JSON summary to stdout.

    Each ``--topic NAME:TYPE[:be][:tl][:n=N]`` (be = best effort, tl = transient local,
    n = messages needed on this topic, default ``--min-count``). Stops after ``--duration`` s
    or when every topic has its count. With ``--wait-for-publishers S`` the ``ready`` line is
    printed only once every topic has a publisher (at most S seconds; ``missing`` lists the
    others): messages published before discovery matched a reliable, volatile subscription
    are lost, so a test starts its input only after that line.
    """
    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("--topic", action="append", default=[])
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--min-count", type=int, default=1)
    ap.add_argument("--summary", choices=["stamps"], default="stamps")
    ap.add_argument("--wait-for-publishers", type=float, default=0.0, metavar="S")
    args = ap.parse_args(argv)
    rclpy.init()
    node = TopicProbe("vggt4d_checker")
    topics: dict[str, int] = {}
    for spec in args.topic:
        name, typ, *flags = spec.split(":")
        node.watch(name, import_type(typ), qos_for(reliable="be" not in flags,
                                                   transient_local="tl" in flags, depth=500))
        counts = [int(f[2:]) for f in flags if f.startswith("n=")]
        topics[name] = counts[0] if counts else args.min_count
    from rclpy.executors import SingleThreadedExecutor
    ex = SingleThreadedExecutor()
    ex.add_node(node)
    try:
        ready: dict[str, Any] = {"ready": True}
        if args.wait_for_publishers > 0:
            spin_until(ex, lambda: all(node.count_publishers(t) for t in topics),
                       args.wait_for_publishers)
            missing = [t for t in topics if not node.count_publishers(t)]
            ready = {"ready": not missing, **({"missing": missing} if missing else {})}
        print(json.dumps(ready), flush=True)
        spin_until(ex, lambda: all(len(node.get(t)) >= n for t, n in topics.items()),
                   args.duration)
        out = {}
        for t in topics:
            msgs = node.get(t)
            out[t] = [_describe(m) for m in msgs]
        print(json.dumps({"topics": out}), flush=True)
    finally:
        ex.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def _describe(msg: Any) -> dict:
    """Stamp, frame_id and a few shape fields of a message, JSON-friendly."""
    d: dict[str, Any] = {}
    header = getattr(msg, "header", None)
    if header is not None:
        d["stamp_ns"] = header.stamp.sec * 1_000_000_000 + header.stamp.nanosec
        d["frame_id"] = header.frame_id
    for f in ("encoding", "height", "width", "child_frame_id", "point_step"):
        if hasattr(msg, f):
            d[f] = getattr(msg, f)
    if hasattr(msg, "transforms"):
        d["transforms"] = [(t.header.frame_id, t.child_frame_id,
                            t.header.stamp.sec * 1_000_000_000 + t.header.stamp.nanosec)
                           for t in msg.transforms]
    return d


if __name__ == "__main__":
    sys.exit(_main())
