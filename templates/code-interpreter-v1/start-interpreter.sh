#!/bin/sh
# Supervises kiln-interpreter (E2B's code-interpreter server on :49999): restarts it when it
# exits, like E2B's systemd units (Restart=on-failure). Runs as root.
exec >>/var/log/kiln-interpreter.log 2>&1
while :; do
    /opt/kiln/bin/kiln-interpreter --default-cwd /home/user
    echo "kiln-interpreter exited with $?; restarting in 1 s"
    sleep 1
done
