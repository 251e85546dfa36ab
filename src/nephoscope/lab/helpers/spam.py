# The lab's spammer: a masquerading interpreter (python3 calling itself exim4) that opens many SMTP
# connections to a sink and holds them. The sink comes from argv, so the image stays the same for any
# sink: `python3 spam.py HOST PORT COUNT` (the test starts it through the agent; with user-mode
# networking HOST 10.0.2.2 is the host's loopback).
import ctypes
import socket
import sys
import time

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ctypes.CDLL(None).prctl(15, b"exim4", 0, 0, 0)  # PR_SET_NAME: comm claims a mail server
conns = []
for _ in range(count):
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(b"EHLO spam.example\r\n")
    conns.append(s)
print("connected", len(conns), flush=True)
while True:
    time.sleep(3600)
