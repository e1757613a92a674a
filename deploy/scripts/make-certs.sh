#!/usr/bin/env bash
# Development CA plus server, Envoy and client certificates for PaletteLink TLS and mTLS (openssl only).
#
#   deploy/scripts/make-certs.sh [OUT_DIR] [EXTRA_NAME ...]
#
# Writes OUT_DIR (default deploy/certs, which git and the Docker build context ignore):
#   ca.crt ca.key          the CA (ca.key never leaves this folder: no container mounts it)
#   server.crt server.key  palettelink-server: server, palettelink-server and its Kubernetes names,
#                          localhost, 127.0.0.1, ::1. Extended key usage serverAuth and clientAuth:
#                          under mTLS the server's own health checks present it to its HTTPS port.
#   envoy.crt envoy.key    Envoy, the entry point: envoy, palettelink and its Kubernetes names,
#                          localhost, 127.0.0.1, ::1. serverAuth for the edges, clientAuth towards the
#                          servers (presented when they require client certificates).
#   client.crt client.key  an edge client (and Prometheus' scrapes under mTLS): clientAuth only.
# EXTRA_NAMEs (the DNS names or IP addresses edges use to reach you, e.g. the LoadBalancer's) go on
# the server and the Envoy certificates. Existing files are kept unless FORCE=1, so re-running is safe
# and adds what an older run did not make (a new CA remakes every certificate).
#
# Permissions: OUT_DIR is made 0700 and ca.key 0600. The other keys are 0644 *inside* that private
# folder: on the host only you can reach them, while the containers, which get each file
# bind-mounted on its own and run as their own users (server and edge 10001, Envoy 101, Prometheus
# 65534), can read them. (Kubernetes takes them into Secrets instead; see deploy/kustomization.yaml.)
# For development and tests: use your own CA in production.
set -euo pipefail

out=${1:-deploy/certs}
shift || true
days=${DAYS:-825}
command -v openssl >/dev/null || { echo "make-certs: openssl is not installed" >&2; exit 2; }
mkdir -p "$out"
chmod 700 "$out"
umask 077

common="DNS:localhost,IP:127.0.0.1,IP:::1"
server_san="DNS:server,DNS:palettelink-server,DNS:palettelink-server.palettelink.svc"
server_san+=",DNS:palettelink-server.palettelink.svc.cluster.local,$common"
envoy_san="DNS:envoy,DNS:palettelink,DNS:palettelink.palettelink.svc"
envoy_san+=",DNS:palettelink.palettelink.svc.cluster.local,$common"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then extra="IP:$name"; else extra="DNS:$name"; fi
  server_san+=",$extra"
  envoy_san+=",$extra"
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
made=()

if [[ ! -f $out/ca.crt || ! -f $out/ca.key || ${FORCE:-0} == 1 ]]; then
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$days" \
    -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=PaletteLink dev CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" 2>/dev/null
  FORCE=1  # every leaf must chain to the new CA
  made+=(ca)
fi

leaf() {  # leaf NAME CN EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]
  [[ -f $out/$1.crt && -f $out/$1.key && ${FORCE:-0} != 1 ]] && return 0
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$3"
    echo "subjectKeyIdentifier=hash"
    echo "authorityKeyIdentifier=keyid"
    if [[ -n ${4:-} ]]; then echo "subjectAltName=$4"; fi
  } > "$tmp/$1.ext"
  openssl req -new -newkey rsa:2048 -nodes -sha256 -keyout "$out/$1.key" -out "$tmp/$1.csr" \
    -subj "/CN=$2" 2>/dev/null
  openssl x509 -req -in "$tmp/$1.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -CAserial "$tmp/ca.srl" -days "$days" -sha256 -extfile "$tmp/$1.ext" -out "$out/$1.crt" 2>/dev/null
  made+=("$1")
}

leaf server palettelink-server serverAuth,clientAuth "$server_san"
leaf envoy palettelink-envoy serverAuth,clientAuth "$envoy_san"
leaf client palettelink-edge clientAuth

chmod 600 "$out/ca.key"
chmod 644 "$out"/*.crt "$out/server.key" "$out/envoy.key" "$out/client.key"
openssl verify -CAfile "$out/ca.crt" "$out/server.crt" "$out/envoy.crt" "$out/client.crt" >/dev/null
if (( ${#made[@]} == 0 )); then
  echo "make-certs: $out already holds every certificate (FORCE=1 to remake them)"
else
  echo "make-certs: wrote ${made[*]} to $out"
  echo "  server names: $server_san"
  echo "  envoy names:  $envoy_san"
fi
