# cut.awk: cut kv.c or kv_test.c at one step of the guide.
#
#   awk -f tools/cut.awk -v steps=tools/steps -v at=STEP [-v extra=STEP] FILE
#
# The markers (documented at the top of kv.c):
#   //> STEP              on a line of its own: what follows, up to the next
#                         such line, arrives at STEP.
#   code;  //> STEP       at the end of a line: that line arrives at STEP.
#   /* retired at STEP: why ... */
#                         a block of code, commented out, that lived from
#                         its section's step up to STEP and was replaced
#                         there; its last line is "*/" alone.
#   {"STEP", "LAST", ...  a row of kv_test.c's table of tests: the test
#                         arrives at STEP and holds up to LAST (NULL: to
#                         the end).
# A line is kept when its step is at or before `at`.  `extra` is one more
# step whose lines are kept too (a flaw's test, cut against earlier code).
# Marker lines themselves, and the comment lines of live retired blocks,
# never appear in a cut.  Runs of blank lines left behind become one.
# Any malformed or unknown marker stops the cut with an error.

function die(msg) { printf "%s:%d: %s\n", FILENAME, FNR, msg > "/dev/stderr"; failed = 1; exit 1 }
function step_of(name) {
    if (!(name in order)) die("unknown step \"" name "\" (see " steps ")")
    return order[name]
}
function keep(s) { return s <= cut || (extra != "" && s == order[extra]) }
function emit(line) {
    if (line ~ /^[ \t]*$/) { if (blank) return; blank = 1 } else blank = 0
    print line
}

BEGIN {
    n = 0
    while ((getline line < steps) > 0) {
        if (line ~ /^[ \t]*(#|$)/) continue
        split(line, f, /[ \t]+/)
        order[f[1]] = n++
    }
    close(steps)
    if (!(at in order)) { print "cut.awk: unknown step \"" at "\"" > "/dev/stderr"; failed = 1; exit 1 }
    if (extra != "" && !(extra in order)) { print "cut.awk: unknown step \"" extra "\"" > "/dev/stderr"; failed = 1; exit 1 }
    cut = order[at]
    section = 0      # the first step until a marker says otherwise
    retired = -1     # inside a retired block: the step that retired it
    blank = 1
}

# The table of tests: every entry must be a well-formed row.
/^static const struct test tests\[\] = \{/ { in_table = 1 }
in_table && /^\};/ { in_table = 0 }
in_table && /^[ \t]*\{/ && !/^[ \t]*\{NULL, / && !/^[ \t]*\{"[a-z][a-z0-9\/-]*", (NULL|"[a-z][a-z0-9\/-]*"), "/ {
    die("a test with no step (since, last): " $0)
}

# A section marker.
/^\/\/> / {
    if (retired >= 0) die("a section marker inside a retired block")
    if (NF != 2) die("a section marker names one step: //> STEP")
    section = step_of($2)
    next
}

# The start of a retired block.
/^[ \t]*\/\* retired at / {
    if (retired >= 0) die("a retired block inside a retired block")
    name = $0
    sub(/^[ \t]*\/\* retired at /, "", name)
    sub(/[: ].*$/, "", name)
    retired = step_of(name)
    if (retired <= section) die("retired at " name ", no later than its own section's step")
    next
}

retired >= 0 && /^[ \t]*\*\/[ \t]*$/ { retired = -1; next }

retired >= 0 {
    if ($0 ~ /\/\*|\*\//) die("a retired block may hold // comments only")
    if ($0 ~ /\/\/> [a-z]/) die("a marker inside a retired block")
    if (cut >= retired) next
}

{
    line = $0
    s = section
    # A line marker at the end of the line.
    if (match(line, /[ \t]*\/\/> [a-z][a-z0-9\/-]*[ \t]*$/)) {
        name = substr(line, RSTART, RLENGTH)
        sub(/^[ \t]*\/\/> /, "", name)
        sub(/[ \t]*$/, "", name)
        ls = step_of(name)
        if (ls < s) die("line marker " name " is earlier than its section's step")
        s = ls
        line = substr(line, 1, RSTART - 1)
    }
    # A row of the tests table: {"STEP", "LAST" or NULL, ...
    if (in_table && match(line, /^[ \t]*\{"[a-z][a-z0-9\/-]*", (NULL|"[a-z][a-z0-9\/-]*"), "/)) {
        row = substr(line, RSTART, RLENGTH)
        split(row, q, /"/)
        since = step_of(q[2])
        if (since < s) die("test row for " q[2] " stands in a later section")
        if (row ~ /, NULL, "$/) {
            last = n
            if (retired >= 0) die("a retired test row must name the last step it holds in")
        } else {
            last = step_of(q[4])
            if (last < since) die("a test that holds until before it arrives")
            if (retired != last + 1) die("a test that holds until " q[4] " must stand in a block retired at the step after it")
        }
        if (!(keep(since) && (cut <= last))) next
        if (!keep(s)) next
        emit(line)
        next
    }
    if (keep(s)) emit(line)
}

END {
    if (failed) exit 1
    if (retired >= 0) { print FILENAME ": a retired block is never closed" > "/dev/stderr"; exit 1 }
}
