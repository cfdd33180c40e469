# `make demo`'s task table: `airflow tasks states-for-dag-run -o plain` (dag_id logical_date task_id state
# start_date end_date map_index) as task, state and wall seconds from Airflow's own start and end dates.
# A mapped task shows its map index (export[1]); a task that never started shows "-". Needs tools/iso_seconds.awk.
$1 == "dag_id" { on = 1; printf "%-28s %-9s %s\n", "task_id", "state", "seconds"; next }
on && NF >= 4 {
    name = $3 (($7 ~ /^[0-9]+$/) ? "[" $7 "]" : "")
    d = elapsed(secs($5), secs($6))
    if (d < 0) { printf "%-28s %-9s %s\n", name, $4, "-"; next }
    printf "%-28s %-9s %7.1f\n", name, $4, d
    total += d
}
END { if (on) printf "%-28s %-9s %7.1f\n", "(all tasks)", "", total }
