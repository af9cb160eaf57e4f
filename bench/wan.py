#!/usr/bin/env python3
"""
A wide-area network on one machine, for the bench: runs a command in a network namespace whose
only way to 127.0.0.1 is a simulated link that delays every IP packet, data and ACKs alike, by
half the round trip in each direction. The stand-in (bench/standin.ts) then runs in a second
namespace at the far end of that link (WAN_SERVER_NETNS).

Why: the stand-in's own latency (lib/local/latency.ts) delays bytes above TCP. The kernels then
see a loopback with no delay, so a segment that Nagle's algorithm holds is released as soon as
the client's ACK is sent, not half a round trip later, and the released bytes arrive at once:
every Nagle hold looks a round trip shorter than on a real network. Here the kernels see the
delay, as over a WAN (MTU 1500, so MSS 1460 too). Linux only; needs root (CAP_NET_ADMIN), no
sch_netem: the link is two TUN devices and this process.

  sudo python3 bench/wan.py --rtt 20 -- npx ts-node bench/bench.ts --wan ...
"""
import argparse
import ctypes
import fcntl
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections import deque

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
libc = ctypes.CDLL(None, use_errno=True)


def setns(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f'setns {path}')
    finally:
        os.close(fd)


def open_tun(name):
    fd = os.open('/dev/net/tun', os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack('16sH', name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def ip(*args):
    subprocess.run(['ip', *args], check=True)


def shuttle(a, b, delay, stop):
    """Moves packets a->b and b->a, each `delay` seconds after it was read; order kept."""
    queues = {a: (b, deque()), b: (a, deque())}
    while not stop.is_set():
        now = time.monotonic()
        due = [q[0][0] for _, q in queues.values() if q]
        timeout = max(0.0, min(due) - now) if due else 0.2
        readable, _, _ = select.select([a, b], [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            queues[fd][1].append((now + delay, os.read(fd, 65536)))
        for out, q in queues.values():
            while q and q[0][0] <= time.monotonic():
                try:
                    os.write(out, q.popleft()[1])
                except OSError:
                    pass  # a packet for a device going down: dropped, as a link would


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rtt', type=float, default=20, help='round trip in ms (default 20)')
    parser.add_argument('command', nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ['--'] else args.command
    if not command:
        parser.error('no command')
    tag = f'pgdsql-wan-{os.getpid()}'
    client, server = f'{tag}-client', f'{tag}-server'
    home = '/proc/self/ns/net'
    home_fd = os.open(home, os.O_RDONLY)
    stop = threading.Event()
    fds = []
    try:
        ip('netns', 'add', client)
        ip('netns', 'add', server)
        for ns in (client, server):
            setns(f'/run/netns/{ns}')
            fds.append(open_tun('wan0'))
        libc.setns(home_fd, CLONE_NEWNET)
        sysctls = ['net.ipv4.conf.all.route_localnet=1', 'net.ipv4.conf.wan0.route_localnet=1', 'net.ipv4.conf.all.rp_filter=0', 'net.ipv4.conf.wan0.rp_filter=0']
        for ns, address in ((client, '10.77.0.1/30'), (server, '10.77.0.2/30')):
            ip('-n', ns, 'addr', 'add', address, 'dev', 'wan0')
            ip('-n', ns, 'link', 'set', 'wan0', 'up')
            subprocess.run(['ip', 'netns', 'exec', ns, 'sysctl', '-q', '-w', *sysctls], check=True)
        # The server's end has its own loopback (PostgreSQL behind the gateway is not across the WAN);
        # the client's has none: 127.0.0.1 is the far end.
        ip('-n', server, 'link', 'set', 'lo', 'up')
        ip('-n', client, 'route', 'add', '127.0.0.0/8', 'dev', 'wan0', 'src', '10.77.0.1')
        thread = threading.Thread(target=shuttle, args=(fds[0], fds[1], args.rtt / 2000, stop), daemon=True)
        thread.start()
        env = {**os.environ, 'WAN_SERVER_NETNS': f'/run/netns/{server}', 'WAN_RTT_MS': str(args.rtt)}
        return subprocess.run(['ip', 'netns', 'exec', client, *command], env=env).returncode
    finally:
        stop.set()
        for fd in fds:
            os.close(fd)
        for ns in (client, server):
            subprocess.run(['ip', 'netns', 'del', ns], stderr=subprocess.DEVNULL)


if __name__ == '__main__':
    sys.exit(main())
