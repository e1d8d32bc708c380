#!/bin/sh
# Create imcli accounts in EMQX's built-in database through its REST API (not run here:
# no EMQX where this project is built). Prompts for each password; the dashboard's admin
# password comes from EMQX_DASHBOARD_PASSWORD (or .env). Usage: ./add-user.sh NAME...
set -eu
cd "$(dirname "$0")"
[ -z "${EMQX_DASHBOARD_PASSWORD:-}" ] && [ -f .env ] && . ./.env
api="${EMQX_API:-http://127.0.0.1:18083/api/v5}"
token=$(curl -fsS -H 'Content-Type: application/json' \
  -d "{\"username\":\"admin\",\"password\":\"${EMQX_DASHBOARD_PASSWORD:?set it in .env}\"}" \
  "$api/login" | sed -n 's/.*"token" *: *"\([^"]*\)".*/\1/p')
for name in "$@"; do
  case "$name" in
    *[!a-z0-9_-]*|[!a-z0-9]*) echo "Error: invalid account name '$name' (use [a-z0-9][a-z0-9_-]{0,31})" >&2; exit 1 ;;
  esac
  [ "${#name}" -le 32 ] || { echo "Error: account name '$name' is longer than 32 characters" >&2; exit 1; }
  stty -echo 2>/dev/null || true
  printf 'Password of %s: ' "$name" >&2; read -r password; echo >&2
  stty echo 2>/dev/null || true
  body=$(printf '{"user_id":"%s","password":"%s"}' "$name" "$(printf '%s' "$password" | sed 's/[\\"]/\\&/g')")
  printf '%s' "$body" | curl -fsS -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    --data-binary @- "$api/authentication/password_based:built_in_database/users" >/dev/null
  echo "account $name created" >&2
done
