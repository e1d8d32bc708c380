#!/usr/bin/env bash
# Refresh the web client's vendored JavaScript (imcli/web/static/vendor) from the npm registry.
# Usage: imcli/web/vendor.sh [MQTT_VERSION]   (default: the pinned version below)
# It takes mqtt.js's prebuilt browser bundle (dist/mqtt.min.js) and its licence, and records
# the version and the tarball's integrity in static/vendor/VERSIONS.txt. Needs npm and tar.
set -euo pipefail
MQTT_VERSION="${1:-5.16.0}"
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/static/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "mqtt@$MQTT_VERSION" >/dev/null
tar xzf "mqtt-$MQTT_VERSION.tgz"
mkdir -p "$dest"
cp package/dist/mqtt.min.js "$dest/mqtt.min.js"
cp package/LICENSE.md "$dest/mqtt.LICENSE.md"
integrity="$(npm view "mqtt@$MQTT_VERSION" dist.integrity)"
printf 'mqtt %s (npm, dist/mqtt.min.js, licence MIT: mqtt.LICENSE.md) %s\n' "$MQTT_VERSION" "$integrity" > "$dest/VERSIONS.txt"
echo "vendored mqtt $MQTT_VERSION into $dest"
