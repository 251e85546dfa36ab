# The lab's raw-socket holder: a python3 process with a raw ICMP socket (as a packet crafter or sniffer
# would open) and an AF_PACKET socket, both held open. `python3 rawsock.py`.
import socket
import time

raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
packet = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
packet.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # it never reads: keep what it buffers small
print("raw", raw.fileno(), "packet", packet.fileno(), flush=True)
while True:
    time.sleep(3600)
