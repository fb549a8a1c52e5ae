"""Takes one whole-file write lock and holds it, for the lock tests.

usage: locker.py PATH KIND WAIT [alarm]
  KIND: ofd (F_OFD_SETLK/F_OFD_SETLKW), posix (F_SETLK/F_SETLKW) or flock (LOCK_EX).
  WAIT: 1 to wait for the lock, 0 to fail at once.
  alarm: SIGALRM (with a handler that raises) arrives after 1 s.
Prints "ready" once the file is open, then "locked", "errno N" or "eintr" (the lock call
failed with EINTR: Python only runs the handler, which raises, if the call returned EINTR).
Then reads commands from stdin: "unlock" (prints "unlocked"), "close" (prints "closed"),
"trylock" (takes the lock again without waiting: prints "locked" or "errno N").
"""
import fcntl, os, struct, sys, signal
path, kind, wait = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
alarm = len(sys.argv) > 4 and sys.argv[4] == "alarm"
class Alarm(Exception):
    pass
def on_alarm(sig, frame):
    raise Alarm()
fd = os.open(path, os.O_RDWR)
def lock(typ, w):
    if kind == "flock":
        op = {fcntl.F_WRLCK: fcntl.LOCK_EX, fcntl.F_UNLCK: fcntl.LOCK_UN}[typ]
        fcntl.flock(fd, op if w else op | fcntl.LOCK_NB)
    else:
        cmd = {("ofd", False): 37, ("ofd", True): 38, ("posix", False): fcntl.F_SETLK, ("posix", True): fcntl.F_SETLKW}[(kind, w)]
        fcntl.fcntl(fd, cmd, struct.pack("hhqqi4x", typ, 0, 0, 0, 0))
if alarm:
    signal.signal(signal.SIGALRM, on_alarm)
print("ready", flush=True)
if alarm:
    signal.alarm(1)
try:
    lock(fcntl.F_WRLCK, wait)
    print("locked", flush=True)
except Alarm:
    print("eintr", flush=True)
    sys.exit(0)
except OSError as e:
    print("errno %d" % e.errno, flush=True)
    sys.exit(0)
# Hold until told: "unlock" unlocks and keeps the file open; "close" closes; EOF exits.
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "unlock":
        lock(fcntl.F_UNLCK, False)
        print("unlocked", flush=True)
    elif cmd == "trylock":
        try:
            lock(fcntl.F_WRLCK, False)
            print("locked", flush=True)
        except OSError as e:
            print("errno %d" % e.errno, flush=True)
    elif cmd == "close":
        os.close(fd)
        print("closed", flush=True)
