# Sourced by compare-cpu.sh and compare-layers.sh: builds one example once per build of the
# crate named in BUILDS and copies each binary aside (the builds share the target folder).
#
#   build_each EXAMPLE OUT   # fills `names`; the binaries are OUT/EXAMPLE-NAME
#
# A build is `default`; a cargo feature added to the defaults, such as `onednn`; or
# NAME:FLAGS, cargo flags separated by commas (`avx2-gemm:--no-default-features,--features=keras`).
build_each() {
  local example=$1 out=$2 build name flags
  names=()
  for build in ${BUILDS:-default}; do
    case $build in
      default) name=default; flags=() ;;
      *:*) name=${build%%:*}; IFS=, read -ra flags <<< "${build#*:}" ;;
      *) name=$build; flags=(--features "$build") ;;
    esac
    cargo build --release --example "$example" "${flags[@]}" >&2
    cp "${CARGO_TARGET_DIR:-target}/release/examples/$example" "$out/$example-$name"
    names+=("$name")
  done
}
