#!/usr/bin/env bash
# Run AFL++ on each fuzz target for SECONDS, one after the other (they share the machine's cores),
# seeded from the repository's own inputs; print executions and findings per target.
# Usage: fuzz/run.sh SECONDS TARGET...   (called by `make fuzz`; run from the repository root)
set -euo pipefail
seconds=$1; shift
root=$(pwd)
seeds=fuzz/target/seeds
rm -rf "$seeds" && mkdir -p "$seeds"/{policy_loader,domain_xml,boot_xml}

# Policy loader: every bad-input case, the examples, the golden policies.
i=0
for f in tests/bad-policies/*.yaml examples/policies/*.yaml tests/golden/*/policy.yaml; do
  cp "$f" "$seeds/policy_loader/$((i++)).yaml"
done
# Domain XML: each <domain> of the test-driver node file on its own, plus the whole file and any
# regression case kept in fuzz/regressions/.
awk -v dir="$seeds/domain_xml" '
  /<domain[ >]/ { n++; out = dir "/domain" n ".xml" }
  out { print > out }
  /<\/domain>/ { close(out); out = "" }' examples/testbed/node.xml
cp examples/testbed/node.xml "$seeds/domain_xml/node.xml"
cp fuzz/regressions/domain_xml/* "$seeds/domain_xml/" 2>/dev/null || true
cp fuzz/regressions/policy_loader/* "$seeds/policy_loader/" 2>/dev/null || true
# Boot-order rewrite: the same documents behind one byte that picks the wanted order.
for f in "$seeds"/domain_xml/*; do
  for b in '\x00' '\x4b' '\xc6'; do
    { printf "$b"; cat "$f"; } > "$seeds/boot_xml/$(basename "$f").$(printf '%s' "$b" | tr -dc '0-9a-f')"
  done
done
cp fuzz/regressions/boot_xml/* "$seeds/boot_xml/" 2>/dev/null || true

# A shared machine: no CPU binding, no core_pattern or governor demands.
export AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
status=0
mkdir -p fuzz/out
for t in "$@"; do
  out=fuzz/out/$t
  rm -rf "$out"
  echo "== $t: ${seconds}s"
  (cd fuzz && cargo afl fuzz -V "$seconds" -i "$root/$seeds/$t" -o "$root/$out" "target/release/$t") > "fuzz/out-$t.log" 2>&1 || {
    echo "afl-fuzz failed; see fuzz/out-$t.log"; tail -20 "fuzz/out-$t.log"; status=1; continue; }
  stats=$out/default/fuzzer_stats
  get() { awk -F' *: ' -v k="$1" '$1 == k { print $2 }' "$stats"; }
  echo "   executions $(get execs_done) ($(get execs_per_sec)/s), corpus $(get corpus_count), crashes $(get saved_crashes), hangs $(get saved_hangs)"
  for c in "$out"/default/crashes/id:* "$out"/default/hangs/id:*; do
    [ -e "$c" ] && { echo "   finding: $c"; status=1; }
  done
done
exit $status
