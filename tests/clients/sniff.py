#!/usr/bin/env python3
"""Shows what clients send on the wire: a TCP relay that prints every command
each client connection sends, then forwards it unchanged.

Usage: sniff.py LISTEN_PORT TARGET_PORT

Not run by the tests; it is how the connect-time tables at the top of
redis_py.py and node.mjs were made (and how to remake them when a library
is upgraded). MONITOR cannot do this: Redis leaves out of MONITOR the commands
it rejects (CLIENT SETINFO before 7.2, CLIENT MAINT_NOTIFICATIONS before 8)
and redacts AUTH. For example:

    redis-server --port 7398 --save '' &
    python3 tests/clients/sniff.py 7397 7398 &
    python3 tests/clients/redis_py.py 7397 7398 --format text   # reads through the relay, not nearcache

Output lines: `<connection number> <command> <args...>` (arguments with
spaces are quoted with repr).
"""

import asyncio
import sys

counter = 0


def parse(buf):
    """Splits complete RESP multibulk (or inline) commands off the front of buf."""
    cmds, i = [], 0
    while i < len(buf):
        end = buf.find(b"\r\n", i)
        if end < 0:
            break
        if buf[i:i + 1] != b"*":
            cmds.append(buf[i:end].decode(errors="replace").split())
            i = end + 2
            continue
        count, k, args = int(buf[i + 1:end]), end + 2, []
        for _ in range(count):
            e = buf.find(b"\r\n", k)
            if e < 0:
                return cmds, buf[i:]
            n = int(buf[k + 1:e])
            if len(buf) < e + 2 + n + 2:
                return cmds, buf[i:]
            args.append(buf[e + 2:e + 2 + n].decode(errors="replace"))
            k = e + 2 + n + 2
        cmds.append(args)
        i = k
    return cmds, buf[i:]


def show(arg):
    return repr(arg) if (" " in arg or not arg) else arg


async def handle(reader, writer, target):
    global counter
    counter += 1
    me = counter
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)

    async def downstream():
        while data := await up_reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    task = asyncio.create_task(downstream())
    pending = b""
    while data := await reader.read(65536):
        pending += data
        cmds, pending = parse(pending)
        for c in cmds:
            print(me, " ".join(show(a) for a in c), flush=True)
        up_writer.write(data)
        await up_writer.drain()
    up_writer.close()
    await task


async def main():
    listen, target = int(sys.argv[1]), int(sys.argv[2])
    server = await asyncio.start_server(lambda r, w: handle(r, w, target), "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    asyncio.run(main())
