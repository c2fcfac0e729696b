#!/usr/bin/env bash
# usage: benchmarks/zoo_cpu_rate.sh PID ZOO_DIR SECONDS -> CPU-seconds of the build process per LoRA committed in the window
# CPU time is what a build costs regardless of how many other processes share the cores.
pid=$1; z=$2; s=$3
c0=$(awk '{print ($14+$15)/100}' /proc/$pid/stat); n0=$(ls $z/adapters | grep -vc '^\.'); t0=$(date +%s)
sleep $s
c1=$(awk '{print ($14+$15)/100}' /proc/$pid/stat); n1=$(ls $z/adapters | grep -vc '^\.'); t1=$(date +%s)
echo "$z: $((n1-n0)) LoRAs in $((t1-t0)) s wall, $(echo "$c1 - $c0" | bc) CPU-s -> $(echo "scale=2; ($c1 - $c0)/($n1-$n0)" | bc) CPU-s/LoRA; loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
