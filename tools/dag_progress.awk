# `make demo`'s live view of `airflow dags test`: every line of Airflow's output goes to the log file (-v logfile=...),
# and the terminal gets one line when a task starts, the step's own progress lines (eupe.progress: the teacher
# zoo's and training's steps, eta, loss), and one line when the task ends with its state and wall seconds (from
# the log's own timestamps, UTC). The input ends with "eupe-dag-exit <status>" (the Makefile appends it after
# Airflow exits); awk exits with that status, or 1 when the line never came (Airflow killed).
# Needs tools/iso_seconds.awk.
function clock(t) { return (secs(t) < 0) ? "--:--:--" : substr(t, 12, 8) }
function field(line, key) {  # the value of key=value in line
    if (!match(line, key "=[^ ]+")) return ""
    return substr(line, RSTART + length(key) + 1, RLENGTH - length(key) - 1)
}
function task(line, i) {  # task_id, with [map index] for a mapped task
    i = field(line, "map_index")
    return field(line, "task_id") ((i ~ /^[0-9]+$/) ? "[" i "]" : "")
}
/^eupe-dag-exit [0-9]+$/ { rc = $2; ended = 1; next }
{ print > logfile }
/\[DAG TEST\] starting task_id=/ {
    name = task($0); start[name] = secs($1); state = ""
    printf "[%s] %s ...\n", clock($1), name; fflush(); next
}
/new_state=/ { state = field($0, "new_state"); next }
/\[DAG TEST\] end task task_id=/ {
    name = task($0); d = (name in start) ? elapsed(start[name], secs($1)) : -1
    printf "[%s] %s: %s%s\n", clock($1), name, (state == "" ? "ended" : state), (d < 0 ? "" : sprintf(" in %.1f s", d))
    fflush(); next
}
/ eupe\.progress: / {
    at = $1; line = $0
    sub(/.* eupe\.progress: /, "", line); sub(/ +\[airflow\.task\..*$/, "", line)
    printf "[%s]   %s\n", clock(at), line; fflush(); next
}
END { close(logfile); if (!ended) exit 1; exit rc }
