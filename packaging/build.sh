#!/bin/bash
# Build the gua deb and rpm packages from this checkout into dist/, then
# lint them (lintian, rpmlint).
#
#   packaging/build.sh            build what the working tree holds
#                                 (tracked files and new, not ignored ones)
#   GUA_BUILD_REF=HEAD packaging/build.sh   build a commit (git archive)
#   GUA_DIST=DIR packaging/build.sh         put the results in DIR
#
# Needs: dpkg-dev, debhelper, dh-python, pybuild-plugin-pyproject,
# python3-setuptools (the deb); rpm (the rpm; skipped with a note when
# rpmbuild is missing); lintian, rpmlint (the lint; skipped likewise).
#
# Writes dist/gua-collector_VERSION_all.deb, dist/gua-report_VERSION_all.deb,
# the source package, dist/gua-collector-VERSION-1.noarch.rpm,
# dist/gua-report-VERSION-1.noarch.rpm, the source rpm, and the lint
# output in dist/lintian.txt and dist/rpmlint.txt.
# Exit status: 0 built and lintian clean, 1 a build failed, 3 lintian
# reported an error or a warning.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
dist=${GUA_DIST:-$top/dist}
# A clean environment: Debian's python3 and tools, not a pyenv shim or an
# activated virtual environment.
cleanenv=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="${HOME:-/root}"
          LC_ALL=C.UTF-8 TERM=dumb)

version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$top/pyproject.toml" | head -n1)
debversion=$(dpkg-parsechangelog -l "$here/debian/changelog" -S Version 2>/dev/null || echo "?")
if [ "$version" != "$debversion" ]; then
    echo "build.sh: pyproject.toml says $version, packaging/debian/changelog says $debversion" >&2
    exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/gua-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
src=$work/gua-$version
mkdir -p "$src" "$dist"

# 1. The source tree, without .git, virtual environments or build output.
if [ -n "${GUA_BUILD_REF:-}" ]; then
    git -c safe.directory="$top" -C "$top" archive --format=tar "$GUA_BUILD_REF" | tar -x -C "$src"
elif git -c safe.directory="$top" -C "$top" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$top" && git -c safe.directory="$top" ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | tar -x -C "$src"
else
    tar -C "$top" --exclude-vcs --exclude=.venv --exclude=dist --exclude=build \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
        -cf - . | tar -x -C "$src"
fi
rm -rf "$src/debian"

# The rpm source tarball: the tree as it is, without debian/.
tar -C "$work" --owner=0 --group=0 -czf "$work/gua-$version.tar.gz" "gua-$version"

# 2. The deb: dpkg-buildpackage wants debian/ at the top of the source.
cp -a "$here/debian" "$src/debian"
rm -f "$dist"/gua_"$version"* "$dist"/gua-collector_"$version"* "$dist"/gua-report_"$version"* \
      "$dist"/gua-*"$version"-*.rpm "$dist"/gua-*"$version"-*.src.rpm \
      "$dist"/lintian.txt "$dist"/rpmlint.txt
echo "== deb"
if ! (cd "$src" && "${cleanenv[@]}" dpkg-buildpackage -us -uc --build=full \
        >"$work/deb.log" 2>&1); then
    tail -n 40 "$work/deb.log" >&2
    echo "build.sh: dpkg-buildpackage failed" >&2
    exit 1
fi
cp "$work"/gua_"$version"* "$work"/gua-collector_"$version"_all.deb \
   "$work"/gua-report_"$version"_all.deb "$dist"/
ls -l "$dist"/*"$version"*.deb

# 3. The rpm, with the shim for macros Debian's rpm lacks.
echo "== rpm"
if command -v rpmbuild >/dev/null; then
    mkdir -p "$work/rpm/SOURCES"
    cp "$work/gua-$version.tar.gz" "$src/deploy/gua.sysusers" "$work/rpm/SOURCES/"
    if ! "${cleanenv[@]}" rpmbuild -ba --nodeps \
            --load "$here/rpm/macros.shim" \
            --define "_topdir $work/rpm" \
            --define "_buildhost localhost" \
            "$here/rpm/gua.spec" >"$work/rpm.log" 2>&1; then
        tail -n 40 "$work/rpm.log" >&2
        echo "build.sh: rpmbuild failed" >&2
        exit 1
    fi
    cp "$work"/rpm/RPMS/noarch/*.rpm "$work"/rpm/SRPMS/*.src.rpm "$dist"/
    ls -l "$dist"/*"$version"-*.rpm
else
    echo "build.sh: rpmbuild not found, no rpm built (apt-get install rpm)"
fi

# 4. Lint. lintian must be clean; rpmlint is recorded (see packaging/README.md).
status=0
echo "== lintian"
if command -v lintian >/dev/null; then
    "${cleanenv[@]}" lintian --display-level '>=pedantic' \
        "$work"/gua_"$version"_*.changes 2>&1 | tee "$dist/lintian.txt" || true
    if grep -qE '^(E|W): ' "$dist/lintian.txt"; then
        echo "build.sh: lintian reported errors or warnings" >&2
        status=3
    fi
else
    echo "lintian not installed" | tee "$dist/lintian.txt"
fi
echo "== rpmlint"
if command -v rpmlint >/dev/null && command -v rpmbuild >/dev/null; then
    "${cleanenv[@]}" rpmlint -c "$here/rpm/rpmlint.toml" \
        "$here/rpm/gua.spec" "$work"/rpm/RPMS/noarch/*.rpm "$work"/rpm/SRPMS/*.src.rpm \
        2>&1 | tee "$dist/rpmlint.txt" || true
else
    echo "rpmlint or rpmbuild not installed" | tee "$dist/rpmlint.txt"
fi
exit $status
