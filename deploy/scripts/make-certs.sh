#!/usr/bin/env bash
# Self-signed CA plus server and client certificates for PaletteLink TLS and mTLS (openssl only).
#
#   deploy/scripts/make-certs.sh [OUT_DIR] [EXTRA_SERVER_NAME ...]
#
# Writes OUT_DIR (default deploy/certs): ca.crt ca.key server.crt server.key client.crt client.key.
# The server certificate covers localhost, 127.0.0.1, the compose/k8s service names (server,
# palettelink-server, envoy, palettelink) and any extra names given. Existing files are kept unless
# FORCE=1, so re-running is safe. For development and tests: use a real CA in production.
set -euo pipefail

out=${1:-deploy/certs}
shift || true
days=${DAYS:-825}
command -v openssl >/dev/null || { echo "make-certs: openssl is not installed" >&2; exit 2; }
mkdir -p "$out"
umask 077

if [[ -f "$out/ca.crt" && -f "$out/server.crt" && -f "$out/client.crt" && "${FORCE:-0}" != 1 ]]; then
  echo "make-certs: $out already holds certificates (FORCE=1 to remake them)"
  exit 0
fi

san="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:server,DNS:palettelink-server,DNS:envoy,DNS:palettelink"
san+=",DNS:palettelink-server.palettelink.svc,DNS:palettelink-server.palettelink.svc.cluster.local"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+=",IP:$name"; else san+=",DNS:$name"; fi
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$days" \
  -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=PaletteLink dev CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

leaf() {  # leaf NAME CN EXTENSIONS
  printf '%s\n' "$3" > "$tmp/$1.ext"
  openssl req -new -newkey rsa:2048 -nodes -sha256 -keyout "$out/$1.key" -out "$tmp/$1.csr" \
    -subj "/CN=$2" 2>/dev/null
  openssl x509 -req -in "$tmp/$1.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -CAserial "$tmp/ca.srl" -days "$days" -sha256 -extfile "$tmp/$1.ext" -out "$out/$1.crt" 2>/dev/null
}

leaf server palettelink-server "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san"
leaf client palettelink-edge "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"

chmod 600 "$out"/*.key
chmod 644 "$out"/*.crt
openssl verify -CAfile "$out/ca.crt" "$out/server.crt" "$out/client.crt" >/dev/null
echo "make-certs: wrote CA, server and client certificates to $out (server names: $san)"
