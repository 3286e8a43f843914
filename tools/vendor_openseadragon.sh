#!/usr/bin/env bash
# Bundle OpenSeadragon (BSD-3-Clause) into the package, for `wsi-convnext view`.
# Run from the repository root when upgrading; the viewer never fetches anything at run time.
# Needs npm (Debian: apt-get install npm); only the npm registry is contacted.
set -euo pipefail
VERSION="${1:-6.1.1}"
DEST=wsi_convnext/outputs/viewer/static/openseadragon
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "openseadragon@${VERSION}" >/dev/null 2>&1 && tar xzf "openseadragon-${VERSION}.tgz")
rm -rf "$DEST"
mkdir -p "$DEST/images"
cp "$work/package/build/openseadragon/openseadragon.min.js" "$DEST/"
cp "$work/package/build/openseadragon/images/"*.png "$DEST/images/"
cp "$work/package/LICENSE.txt" "$DEST/LICENSE.txt"
echo "$VERSION" > "$DEST/VERSION"
echo "bundled openseadragon $VERSION into $DEST"
