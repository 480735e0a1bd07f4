#!/usr/bin/env bash
# Build the ROS 2 message packages this node needs into a venv WITHOUT a ROS install
# (recipe in ../shared/ROS_ENV.md). Idempotent; each package is skipped when it already imports
# (a ROS install, or an earlier run with the same .msg files).
#
#   scripts/build_interfaces.sh [VENV]        (default: .venv; FORCE=1 rebuilds)
#
# (a) tf2_msgs: no wheel exists; generated from its one-line TFMessage.msg
#     (`geometry_msgs/TransformStamped[] transforms`) into the venv (an ament prefix).
# (b) vggt4d_ros interfaces (msg/*.msg): built from this repo's CMakeLists.txt with
#     -DVGGT4D_INTERFACES_ONLY=ON, the same file colcon uses in a ROS workspace.
#
# How `vggt4d_ros.msg` and the editable source package `vggt4d_ros` share one name: CMake
# installs the generated Python module (msg/ + the type-support extension modules) into
# site-packages/vggt4d_ros; this script moves that directory to
# $VENV/lib/vggt4d_ros_interfaces/vggt4d_ros (NOT on sys.path, so it can never shadow the
# sources) and drops the package-level __init__.py and egg-info rosidl adds. The source
# package's vggt4d_ros/__init__.py appends that directory to its __path__ when it exists, so
# `import vggt4d_ros` loads the sources and `vggt4d_ros.msg` the generated module. The C
# libraries stay in $VENV/lib (the ROS wheels put it on LD_LIBRARY_PATH). In a ROS workspace
# colcon installs the sources and the generated module into the same directory instead.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=$(cd "${1:-${VENV:-.venv}}" && pwd)
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "[interfaces] no python in $VENV" >&2; exit 1; }
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
MSG_HASH=$(cat msg/*.msg CMakeLists.txt package.xml | sha256sum | cut -d' ' -f1)
MSG_STAMP="$VENV/.vggt4d_interfaces_stamp"

importable() {  # importable <python statement>   (the sources count even before pip install -e)
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "$1" >/dev/null 2>&1
}

need_tf2=1; need_own=1
if [ -z "${FORCE:-}" ]; then
  importable 'from tf2_msgs.msg import TFMessage' && need_tf2=0
  if [ -f "$MSG_STAMP" ] && [ "$(cat "$MSG_STAMP")" = "$MSG_HASH" ] && \
     importable 'from vggt4d_ros.msg import Status'; then
    need_own=0
  fi
  # A ROS install providing vggt4d_ros (colcon) also counts, stamp or not.
  if [ -n "${AMENT_PREFIX_PATH:-}" ] && [ "${AMENT_PREFIX_PATH%%:*}" != "$VENV" ] && \
     importable 'from vggt4d_ros.msg import Status'; then
    need_own=0
  fi
fi
if [ $need_tf2 = 0 ] && [ $need_own = 0 ]; then
  echo "[interfaces] tf2_msgs and vggt4d_ros.msg already importable"
  exit 0
fi

# 1. Build-only wheels (pinned).
echo "[interfaces] installing rosidl/ament build wheels into $VENV"
"$PY" -m pip install -q --disable-pip-version-check -r requirements-rosidl.txt

# 2. The wheels' exported CMake targets name the wheel build machine's include dirs; point them
#    at this interpreter's (idempotent: only the foreign strings are replaced).
PY_INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NP_INC=$("$PY" -c 'import numpy; print(numpy.get_include())')
"$PY" - "$VENV/share" "$PY_INC" "$NP_INC" <<'EOF'
import pathlib, re, sys
share, py_inc, np_inc = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
np_pat = re.compile(r"/opt/python/[^;\"\s]*?/site-packages/numpy/(?:_core|core)/include")
py_pat = re.compile(r"/opt/python/[^;\"\s/]+/include/python3\.\d+")
fixed = 0
for path in share.rglob("*.cmake"):
    text = path.read_text()
    if "/opt/python/" not in text:
        continue
    new = py_pat.sub(py_inc, np_pat.sub(np_inc, text))
    if new != text:
        path.write_text(new)
        fixed += 1
print(f"[interfaces] fixed include paths in {fixed} CMake export files")
EOF

BUILD=$(mktemp -d "${TMPDIR:-/tmp}/vggt4d_interfaces.XXXXXX")
trap 'rm -rf "$BUILD"' EXIT
CMAKE_ENV=(env AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
           CMAKE_PREFIX_PATH="$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
           PATH="$VENV/bin:$PATH")
cmake_build() {  # cmake_build <source dir> <build dir> [extra cmake args...]
  local src=$1 bld=$2; shift 2
  "${CMAKE_ENV[@]}" cmake -S "$src" -B "$bld" -DCMAKE_INSTALL_PREFIX="$VENV" \
      -DPython3_EXECUTABLE="$PY" -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release "$@" >"$bld.log" 2>&1 \
    && "${CMAKE_ENV[@]}" cmake --build "$bld" -j "${JOBS:-2}" >>"$bld.log" 2>&1 \
    && "${CMAKE_ENV[@]}" cmake --install "$bld" >>"$bld.log" 2>&1 \
    || { echo "[interfaces] build of $src failed; log:" >&2; tail -40 "$bld.log" >&2; exit 1; }
}

# 3a. tf2_msgs from its definition.
if [ $need_tf2 = 1 ]; then
  echo "[interfaces] building tf2_msgs into $VENV"
  PKG="$BUILD/src/tf2_msgs"
  mkdir -p "$PKG/msg"
  echo "geometry_msgs/TransformStamped[] transforms" > "$PKG/msg/TFMessage.msg"
  cat > "$PKG/package.xml" <<'EOF'
<?xml version="1.0"?>
<package format="3">
  <name>tf2_msgs</name>
  <version>0.0.0</version>
  <description>tf2_msgs/TFMessage generated locally (no wheel exists); same definition as ROS 2.</description>
  <maintainer email="vggt4d-ros@example.org">vggt4d_ros developers</maintainer>
  <license>BSD-3-Clause</license>
  <buildtool_depend>ament_cmake</buildtool_depend>
  <buildtool_depend>rosidl_default_generators</buildtool_depend>
  <depend>geometry_msgs</depend>
  <exec_depend>rosidl_default_runtime</exec_depend>
  <member_of_group>rosidl_interface_packages</member_of_group>
  <export><build_type>ament_cmake</build_type></export>
</package>
EOF
  cat > "$PKG/CMakeLists.txt" <<'EOF'
cmake_minimum_required(VERSION 3.16)
project(tf2_msgs NONE)
enable_language(C CXX)
find_package(ament_cmake REQUIRED)
find_package(rosidl_default_generators REQUIRED)
find_package(geometry_msgs REQUIRED)
rosidl_generate_interfaces(${PROJECT_NAME} "msg/TFMessage.msg" DEPENDENCIES geometry_msgs)
ament_export_dependencies(rosidl_default_runtime)
ament_package()
EOF
  cmake_build "$PKG" "$BUILD/build_tf2_msgs"
  importable 'from tf2_msgs.msg import TFMessage' || {
    echo "[interfaces] tf2_msgs built but does not import" >&2; exit 1; }
fi

# 3b. Our own interfaces, from the repo's CMakeLists.txt (interfaces only).
if [ $need_own = 1 ]; then
  echo "[interfaces] building vggt4d_ros interfaces (msg/*.msg) into $VENV"
  cmake_build "$REPO" "$BUILD/build_vggt4d_ros" -DVGGT4D_INTERFACES_ONLY=ON
  GEN="$VENV/lib/vggt4d_ros_interfaces"
  rm -rf "$GEN" && mkdir -p "$GEN"
  mv "$SITE/vggt4d_ros" "$GEN/vggt4d_ros"
  rm -rf "$GEN/vggt4d_ros/__init__.py" "$GEN/vggt4d_ros/__pycache__" "$SITE"/vggt4d_ros-*.egg-info
  if importable 'from vggt4d_ros.msg import Status'; then
    echo "$MSG_HASH" > "$MSG_STAMP"
  else
    echo "[interfaces] vggt4d_ros.msg built but does not import" >&2; exit 1
  fi
fi
echo "[interfaces] done"
