# `make demo`'s task table: `airflow tasks states-for-dag-run -o plain` (dag_id logical_date task_id state
# start_date end_date map_index) as task, state and wall seconds from Airflow's own start and end dates.
# A mapped task shows its map index (export[1]); a task that never started shows "-".
function secs(t, p) {
    if (t !~ /^[0-9][0-9][0-9][0-9]-/) return -1
    split(t, p, /[T:]/)  # p[2] hours, p[3] minutes, p[4] seconds with the zone after them (numeric prefix)
    return p[2] * 3600 + p[3] * 60 + p[4]
}
$1 == "dag_id" { on = 1; printf "%-28s %-9s %s\n", "task_id", "state", "seconds"; next }
on && NF >= 4 {
    name = $3 (($7 ~ /^[0-9]+$/) ? "[" $7 "]" : "")
    s = secs($5); e = secs($6)
    if (s < 0 || e < 0) { printf "%-28s %-9s %s\n", name, $4, "-"; next }
    d = e - s
    if (d < 0) d += 86400  # across midnight
    printf "%-28s %-9s %7.1f\n", name, $4, d
    total += d
}
END { if (on) printf "%-28s %-9s %7.1f\n", "(all tasks)", "", total }
