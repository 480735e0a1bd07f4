"""``vggt4d-bag-play``: play a rosbag2 (sqlite3 or mcap) like ``ros2 bag play --clock``.

Messages are published unchanged (their header stamps are the recorded ones), in log-time
order, paced by the log times divided by ``--rate``; ``/clock`` (rosgraph_msgs/Clock) carries
the bag time — before every message and at ``--clock-hz`` in between — so a node with
``use_sim_time:=true`` runs exactly as with a real ``ros2 bag play --clock``. Bags are read
with ``rosbags`` and the raw CDR bytes are deserialised by rclpy itself
(``rclpy.serialization.deserialize_message``), so the messages are bit-exact.

    vggt4d-bag-play BAG [--rate 2.0] [--loop] [--remap /camera/image_raw:=/image]
                        [--topics /camera/image_raw /camera/camera_info] [--no-clock]
                        [--wait-for-subscribers 30] [--start-paused-s 0.5]
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import rclpy
from rclpy.node import Node
from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy
from rclpy.serialization import deserialize_message
from rosbags.rosbag2 import Reader
from rosgraph_msgs.msg import Clock

LATCHED_TOPICS = ("/tf_static",)


def message_class(msgtype: str) -> type:
    """``"sensor_msgs/msg/Image"`` → the rclpy class (ImportError names the package)."""
    pkg, kind, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"message type {msgtype} is not available in this environment "
                          f"({exc})") from exc


def parse_remaps(remaps: Sequence[str]) -> dict[str, str]:
    """``["/a:=/b", ...]`` → ``{"/a": "/b"}`` (clear error on a malformed entry)."""
    out = {}
    for r in remaps:
        src, sep, dst = r.partition(":=")
        if not sep or not src or not dst:
            raise ValueError(f"bad remap {r!r}; expected FROM:=TO")
        out[src] = dst
    return out


def read_raw(bag: Path, topics: Optional[Sequence[str]] = None
             ) -> Iterator[tuple[str, str, int, bytes]]:
    """(topic, msgtype, log time ns, raw CDR) in log-time order."""
    if not (bag / "metadata.yaml").is_file():
        raise FileNotFoundError(f"{bag} is not a rosbag2 folder (no metadata.yaml)")
    with Reader(bag) as reader:
        conns = [c for c in reader.connections if topics is None or c.topic in topics]
        if topics is not None:
            missing = set(topics) - {c.topic for c in conns}
            if missing:
                raise KeyError(f"topics {sorted(missing)} not in {bag}; available: "
                               f"{sorted({c.topic for c in reader.connections})}")
        if not conns:
            return
        for conn, stamp, raw in reader.messages(connections=conns):
            yield conn.topic, conn.msgtype, int(stamp), bytes(raw)


class BagPlayer(Node):
    """Publishes a bag's messages with their recorded stamps, plus /clock."""

    def __init__(self, bag: Path, rate: float = 1.0, remaps: Optional[dict[str, str]] = None,
                 topics: Optional[Sequence[str]] = None, clock: bool = True,
                 clock_hz: float = 100.0, **kwargs) -> None:
        super().__init__("vggt4d_bag_player", **kwargs)
        if rate <= 0:
            raise ValueError(f"--rate must be > 0, got {rate}")
        self.bag, self.rate, self.topics = Path(bag), rate, topics
        self.remaps = remaps or {}
        self.clock_period = 1.0 / clock_hz if clock and clock_hz > 0 else None
        self.pub_clock = self.create_publisher(Clock, "/clock", 10) if clock else None
        self._pubs: dict[str, object] = {}
        self.published = 0
        with Reader(self.bag) as reader:          # create every publisher up front
            for c in reader.connections:
                if topics is None or c.topic in topics:
                    self._publisher(c.topic, c.msgtype)

    def _publisher(self, topic: str, msgtype: str):
        name = self.remaps.get(topic, topic)
        if name not in self._pubs:
            latched = topic in LATCHED_TOPICS
            qos = QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE,
                             durability=(QoSDurabilityPolicy.TRANSIENT_LOCAL if latched
                                         else QoSDurabilityPolicy.VOLATILE))
            self._pubs[name] = (self.create_publisher(message_class(msgtype), name, qos),
                                message_class(msgtype))
        return self._pubs[name]

    def wait_for_subscribers(self, timeout_s: float) -> bool:
        """Wait (wall clock) until every data topic has a subscriber; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(p.get_subscription_count() > 0 for p, _ in self._pubs.values()):
                return True
            time.sleep(0.05)
        return False

    def _publish_clock(self, bag_ns: int) -> None:
        if self.pub_clock is not None:
            msg = Clock()
            msg.clock.sec, msg.clock.nanosec = divmod(int(bag_ns), 1_000_000_000)
            self.pub_clock.publish(msg)

    def _sleep_until(self, wall_target: float, bag_at) -> None:
        """Sleep until ``wall_target`` (monotonic), publishing /clock on the way."""
        while True:
            now = time.monotonic()
            if now >= wall_target:
                return
            step = wall_target - now
            if self.clock_period is not None:
                step = min(step, self.clock_period)
                self._publish_clock(bag_at(now))
            time.sleep(step)

    def play_once(self) -> int:
        """Play the bag once; returns the number of messages published."""
        start_wall, start_bag, count = None, None, 0
        for topic, msgtype, stamp, raw in read_raw(self.bag, self.topics):
            if not rclpy.ok(context=self.context):
                break
            if start_wall is None:
                start_wall, start_bag = time.monotonic(), stamp
            target = start_wall + (stamp - start_bag) / 1e9 / self.rate
            self._sleep_until(target, lambda now: start_bag + int((now - start_wall)
                                                                  * self.rate * 1e9))
            self._publish_clock(stamp)
            pub, cls = self._publisher(topic, msgtype)
            pub.publish(deserialize_message(raw, cls))
            count += 1
        self.published += count
        return count


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vggt4d-bag-play", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bag", type=Path, help="rosbag2 folder (sqlite3 or mcap)")
    ap.add_argument("--rate", type=float, default=1.0, help="playback speed factor (> 0)")
    ap.add_argument("--loop", action="store_true", help="play again and again (stamps jump "
                    "back at each start: the node resets, as with ros2 bag play --loop)")
    ap.add_argument("--loops", type=int, default=0, help="with --loop: stop after N plays "
                    "(0 = forever)")
    ap.add_argument("--remap", action="append", default=[], metavar="FROM:=TO",
                    help="topic remap, repeatable")
    ap.add_argument("--topics", nargs="+", default=None, help="only these bag topics")
    ap.add_argument("--no-clock", action="store_true", help="do not publish /clock")
    ap.add_argument("--clock-hz", type=float, default=100.0, help="/clock rate between messages")
    ap.add_argument("--wait-for-subscribers", type=float, default=0.0, metavar="S",
                    help="wait up to S seconds until every topic has a subscriber")
    ap.add_argument("--start-delay", type=float, default=0.0, metavar="S",
                    help="seconds to wait before the first message (after discovery)")
    return ap


def main(args: Optional[list[str]] = None) -> int:
    """Console script ``vggt4d-bag-play``. ROS arguments after ``--ros-args`` go to rclpy."""
    argv = list(sys.argv[1:] if args is None else args)
    ros_args = []
    if "--ros-args" in argv:
        i = argv.index("--ros-args")
        argv, ros_args = argv[:i], argv[i:]
    opts = build_parser().parse_args(argv)
    try:
        remaps = parse_remaps(opts.remap)
    except ValueError as exc:
        build_parser().error(str(exc))
    rclpy.init(args=["vggt4d-bag-play", *ros_args])
    player = None
    try:
        player = BagPlayer(opts.bag, opts.rate, remaps, opts.topics, clock=not opts.no_clock,
                           clock_hz=opts.clock_hz)
        log = player.get_logger()
        if opts.wait_for_subscribers > 0 and not player.wait_for_subscribers(
                opts.wait_for_subscribers):
            log.warning("not every topic has a subscriber; playing anyway")
        time.sleep(max(0.0, opts.start_delay))
        plays = 0
        while rclpy.ok():
            n = player.play_once()
            plays += 1
            log.info(f"played {n} messages from {opts.bag} (play {plays})")
            if not opts.loop or (opts.loops and plays >= opts.loops):
                break
        return 0
    except (FileNotFoundError, KeyError, ImportError, ValueError) as exc:
        print(f"vggt4d-bag-play: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        if player is not None:
            player.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
