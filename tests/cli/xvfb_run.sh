#!/usr/bin/env bash
# usage: xvfb_run.sh [-s "Xvfb args"] COMMAND...
# Runs COMMAND with DISPLAY set to a private Xvfb server and exits with COMMAND's status. The server picks a
# free display itself (-displayfd: no race for display numbers) and is stopped however COMMAND ends: on exit,
# on an error, when this script is ended by a signal, and, through a small watcher process, when this script
# is killed outright (e.g. by a test timeout), so that no Xvfb outlives the test.
set -u
xargs_="-screen 0 1920x1200x24"
if [ "${1:-}" = "-s" ]; then xargs_=$2; shift 2; fi
if [ $# -eq 0 ]; then echo "usage: xvfb_run.sh [-s \"Xvfb args\"] COMMAND..." >&2; exit 2; fi
command -v Xvfb >/dev/null || { echo "error: Xvfb not found (install the xvfb package: make setup)" >&2; exit 2; }

dir=$(mktemp -d -t eplab-xvfb.XXXXXX) || exit 2
xvfb= child=
stop() {
  [ -n "$child" ] && kill "$child" 2>/dev/null
  if [ -n "$xvfb" ]; then kill "$xvfb" 2>/dev/null; wait "$xvfb" 2>/dev/null; fi
  rm -rf "$dir"
}
trap stop EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

# Xvfb's output goes to a file, never to our stdout/stderr: a pipe held open by a server would keep the
# test's reader waiting.
# shellcheck disable=SC2086
Xvfb -displayfd 3 $xargs_ -nolisten tcp 3>"$dir/display" </dev/null >"$dir/xvfb.log" 2>&1 &
xvfb=$!
# The watcher: stops the server if this script disappears without running stop() (SIGKILL). It waits for
# the end of a pipe whose only writer is this script (fd 9, closed for the command below), so it wakes up
# the moment the script is gone, however it ended, and exits right after a normal end too.
exec 9> >(exec >/dev/null 2>&1; read -r _; [ "$(cat /proc/"$xvfb"/comm)" = Xvfb ] && kill "$xvfb"; exit 0)

for _ in $(seq 200); do  # up to 20 s for the server to be ready (it writes the display number then)
  [ -s "$dir/display" ] && break
  if ! kill -0 "$xvfb" 2>/dev/null; then
    echo "error: Xvfb failed to start:" >&2; cat "$dir/xvfb.log" >&2; exit 2
  fi
  sleep 0.1
done
[ -s "$dir/display" ] || { echo "error: Xvfb did not become ready in 20 s" >&2; cat "$dir/xvfb.log" >&2; exit 2; }

# In the background and waited for, so that a signal to this script is acted on at once (bash runs traps
# only between commands); the command keeps our stdin.
DISPLAY=:$(head -n1 "$dir/display") "$@" <&0 9>&- &
child=$!
wait "$child"
rc=$?
child=
exit $rc
