#!/usr/bin/env python3
"""A shaped link for the benchmarks: a TCP relay with a one-way delay and a rate cap.

    relay.py --rate 100M --rtt 40 [--queue BYTES] [--log-dir DIR] HOST PORT
    relay.py --fdpass [--log-dir DIR] HOST PORT

Used as an ssh ProxyCommand (`ProxyCommand exec python3 bench/relay.py ... %h %p`): it
connects to HOST:PORT and carries stdin to the socket and the socket to stdout. This
kernel has no netem, so delay and rate are made here, the same in both directions:

- rate: each chunk read (up to 64 KiB) is serialized at --rate bits per second behind
  the chunks before it (a token bucket with a burst of one chunk: a chunk leaves when the
  link has carried the previous ones);
- delay: a chunk is delivered --rtt/2 milliseconds after its last byte left;
- buffer: at most --queue bytes (default two bandwidth-delay products, at least 256 KiB)
  are queued or in flight per direction; beyond that the relay stops reading, so the
  sender feels the link (back-pressure), as it would behind a router's queue.

With --log-dir, it writes DIR/relay.PID.pid while it runs, and at the end (EOF both ways,
or SIGHUP/SIGTERM, which ssh sends when it is done) DIR/relay.PID.log: "C2S S2C CPU",
the bytes carried each way (payload, i.e. the ssh stream) and its own CPU seconds.

With --fdpass (ssh's `ProxyUseFdpass yes`) nothing is relayed: it connects, hands the
socket to ssh and stays in the background with a copy of it; once no other process holds
the socket (ssh has exited, and so has the ControlMaster it may have forked) it reads
the connection's own counters from the kernel (TCP_INFO bytes_acked and bytes_received,
the ssh stream each way) into the same log, and closes. So an unshaped connection is
counted exactly, without a hop in the data path and whatever else crosses loopback.
"""

import argparse
import collections
import fcntl
import os
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time

CHUNK = 65536


def parse_rate(text):
    """'100M', '1G', '800k' or a plain number: bits per second."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9}
    t = text.strip().lower().removesuffix("bit").removesuffix("bps")
    if t and t[-1] in units:
        return float(t[:-1]) * units[t[-1]]
    return float(t)


class Direction:
    """One way of the link: chunks read from `src` are stamped with their delivery time
    and written to `dst` at that time (by the event loop in `run`)."""

    def __init__(self, src, dst, rate_bps, delay_s, limit):
        self.src, self.dst = src, dst
        self.byte_time = 8.0 / rate_bps
        self.delay = delay_s
        self.limit = limit
        self.queue = collections.deque()  # (due, data), in order
        self.queued = 0
        self.sent = 0  # bytes of the head chunk already written
        self.eof = False  # src said EOF
        self.closed = False  # dst shut down after the last chunk
        self.carried = 0
        self.free_at = 0.0  # when the link has finished sending what is queued

    def take(self, data, now):
        self.carried += len(data)
        start = max(now, self.free_at)
        self.free_at = start + len(data) * self.byte_time
        self.queue.append((self.free_at + self.delay, data))
        self.queued += len(data)

    def want_read(self):
        return not self.eof and self.queued < self.limit

    def due(self):
        return self.queue[0][0] if self.queue else None


def run(dirs, read, write, shut):
    """The event loop: reads while a direction has room, writes each chunk once it is due."""
    sel = selectors.DefaultSelector()
    registered = {}

    def want(fd, events):
        if registered.get(fd) == events:
            return
        if events:
            (sel.modify if fd in registered else sel.register)(fd, events)
            registered[fd] = events
        elif fd in registered:
            sel.unregister(fd)
            del registered[fd]

    while not all(d.closed for d in dirs):
        now = time.monotonic()
        timeout = None
        events = collections.defaultdict(int)
        for d in dirs:
            if d.want_read():
                events[d.src] |= selectors.EVENT_READ
            due = d.due()
            if due is not None:
                if due <= now:
                    events[d.dst] |= selectors.EVENT_WRITE
                else:
                    timeout = due - now if timeout is None else min(timeout, due - now)
            elif d.eof and not d.closed:
                shut(d.dst, d)
                d.closed = True
        for d in dirs:
            want(d.src, events.get(d.src, 0))
            want(d.dst, events.get(d.dst, 0))
        if all(d.closed for d in dirs):
            break
        if not registered and timeout is None:
            break
        ready = sel.select(timeout)
        now = time.monotonic()
        for key, mask in ready:
            fd = key.fd
            for d in dirs:
                if d.src == fd and mask & selectors.EVENT_READ and d.want_read():
                    try:
                        data = read(fd, CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if data:
                        d.take(data, now)
                    else:
                        d.eof = True
                if d.dst == fd and mask & selectors.EVENT_WRITE and d.queue and d.queue[0][0] <= now:
                    due, data = d.queue[0]
                    try:
                        n = write(fd, memoryview(data)[d.sent:])
                    except BlockingIOError:
                        continue
                    except OSError:
                        # The far side is gone: drop what is left, stop this way.
                        d.queue.clear()
                        d.queued = 0
                        d.eof = True
                        continue
                    d.sent += n
                    if d.sent == len(data):
                        d.queue.popleft()
                        d.queued -= len(data)
                        d.sent = 0


def holders(inode, me):
    """The processes other than `me` that have the socket `inode` open."""
    target = f"socket:[{inode}]"
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            for fd in os.listdir(f"/proc/{name}/fd"):
                if os.readlink(f"/proc/{name}/fd/{fd}") == target:
                    found.append(int(name))
                    break
        except OSError:
            continue
    return found


def fdpass(host, port, log_dir):
    """--fdpass: connect, pass the socket to ssh (stdout is a Unix socket), and count."""
    ssh = os.getppid()
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    inode = os.fstat(sock.fileno()).st_ino
    if os.fork() > 0:
        socket.send_fds(socket.socket(fileno=1), [b"\0"], [sock.fileno()])
        os._exit(0)
    # The child: out of ssh's way (it waits for the parent only) until no other process
    # holds the socket: ssh, or the ControlMaster it forks into the background.
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    pid = os.getpid()
    if log_dir:
        pidfile = os.path.join(log_dir, f"relay.{pid}.pid")
        with open(pidfile, "w") as f:
            f.write(f"{pid}\n")
    watch = [ssh]
    deadline = time.monotonic() + 7200
    while watch and time.monotonic() < deadline:
        fds = []
        for p in watch:
            try:
                fds.append(os.pidfd_open(p))
            except OSError:
                pass  # already gone
        while fds:
            ready, _, _ = select.select(fds, [], [], 60)
            for fd in ready:
                os.close(fd)
                fds.remove(fd)
        watch = holders(inode, pid)
    time.sleep(0.005)  # the last acks
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    acked, received = struct.unpack_from("QQ", info, 120)  # tcpi_bytes_acked, tcpi_bytes_received
    sock.close()
    if log_dir:
        logfile = os.path.join(log_dir, f"relay.{pid}.log")
        t = os.times()
        with open(logfile + ".tmp", "w") as f:
            f.write(f"{acked} {received} {t.user + t.system:.3f}\n")
        os.rename(logfile + ".tmp", logfile)
        os.unlink(pidfile)
    os._exit(0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fdpass", action="store_true", help="count an unshaped connection, relay nothing")
    ap.add_argument("--rate", help="bits per second, e.g. 100M or 1G")
    ap.add_argument("--rtt", type=float, help="round-trip time in ms")
    ap.add_argument("--queue", type=int, help="bytes queued or in flight per direction")
    ap.add_argument("--log-dir")
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    a = ap.parse_args()
    if a.fdpass:
        return fdpass(a.host, a.port, a.log_dir)
    if a.rate is None or a.rtt is None:
        ap.error("--rate and --rtt are needed (or --fdpass)")
    rate = parse_rate(a.rate)
    delay = a.rtt / 2000.0
    limit = a.queue or max(2 * int(rate / 8 * a.rtt / 1000.0), 256 << 10)

    pid = os.getpid()
    pidfile = logfile = None
    if a.log_dir:
        pidfile = os.path.join(a.log_dir, f"relay.{pid}.pid")
        logfile = os.path.join(a.log_dir, f"relay.{pid}.log")
        with open(pidfile, "w") as f:
            f.write(f"{pid}\n")

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Small socket buffers on the relay's side, so little hides behind the shaped queue.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 << 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.connect((a.host, a.port))

    sock.setblocking(False)
    for fd in (0, 1):
        os.set_blocking(fd, False)
        try:  # a pipe from ssh: a bigger kernel buffer means fewer wake-ups
            fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ
        except OSError:
            pass
    s = sock.fileno()
    c2s = Direction(0, s, rate, delay, limit)
    s2c = Direction(s, 1, rate, delay, limit)

    def read(fd, n):
        return sock.recv(n) if fd == s else os.read(fd, n)

    def write(fd, view):
        return sock.send(view) if fd == s else os.write(fd, view)

    def shut(fd, _d):
        try:
            if fd == s:
                sock.shutdown(socket.SHUT_WR)
            else:
                os.close(fd)
        except OSError:
            pass

    done = threading.Lock()

    def finish(*_):
        if not done.acquire(blocking=False):
            return
        if logfile:
            t = os.times()
            with open(logfile + ".tmp", "w") as f:
                f.write(f"{c2s.carried} {s2c.carried} {t.user + t.system:.3f}\n")
            os.rename(logfile + ".tmp", logfile)
            os.unlink(pidfile)
        os._exit(0)

    signal.signal(signal.SIGHUP, finish)
    signal.signal(signal.SIGTERM, finish)
    run([c2s, s2c], read, write, shut)
    finish()


if __name__ == "__main__":
    sys.exit(main())
