#!/bin/sh
# A stand-in for Valve's steamcmd (Steam is unreachable from the test machines).
#
# It takes the real program's command line, in order, as the real one runs
# its "+command args" (only the commands the agent uses):
#   steamcmd +force_install_dir <dir> +login anonymous
#            +workshop_download_item <appid> <itemid> +quit
# and prints the real program's lines for them, its success line included:
#   Success. Downloaded item <id> to "<dir>/steamapps/workshop/content/<appid>/<id>" (<n> bytes)
# or its failure line:
#   ERROR! Download item <id> failed (<reason>).
# The item's content goes where the real one puts it:
#   <force_install_dir>/steamapps/workshop/content/<appid>/<itemid>/
#
# What it "downloads" depends on the item id (its catalogue):
#   1001  a small mod: mod.cpp, addons/thing.pbo (3000 bytes), keys/a.bikey
#   1002  hostile: a link to /etc/passwd, a link to /, a FIFO, a reserved
#         name, beside one good file; its success line names a path with ../
#   1003  huge: a 64 MiB sparse file beside a small one
#   1004  "ERROR! Download item 1004 failed (Failure)." and exit code 0, as the
#         real one often does
#   1005  no outcome line, exit code 8
#   1006  hangs (a download that never ends)
#   1007  a success line, but no content (a known steamcmd behaviour)
#   1008  a success line for another item
#   1009  the item's folder is a link to /etc
#   other "ERROR! Download item <id> failed (File Not Found)."
set -u

echo "Redirecting stderr to '${HOME:-/tmp}/Steam/logs/stderr.txt'"
echo "[  0%] Checking for available updates..."
echo "[----] Verifying installation..."
echo "Steam Console Client (c) Valve Corporation - version 1716242052"
echo "-- type 'quit' to exit --"
echo "Loading Steam API...OK"
mkdir -p "${HOME:-/tmp}/Steam/logs" 2>/dev/null

install_dir=""
logged_in=""

item() {
    app=$1
    id=$2
    dir="$install_dir/steamapps/workshop/content/$app/$id"
    echo "Downloading item $id ..."
    case "$id" in
        1001)
            mkdir -p "$dir/addons" "$dir/keys"
            echo 'name = "Stand-in Mod";' > "$dir/mod.cpp"
            dd if=/dev/zero bs=1000 count=3 2>/dev/null | tr '\0' 'p' > "$dir/addons/thing.pbo"
            echo key > "$dir/keys/a.bikey"
            echo "Success. Downloaded item $id to \"$dir\" (3027 bytes)"
            ;;
        1002)
            mkdir -p "$dir"
            echo good > "$dir/good.txt"
            ln -s /etc/passwd "$dir/passwd"
            ln -s / "$dir/root"
            mkfifo "$dir/pipe"
            echo sneaky > "$dir/.ctrlagent-tmp-planted"
            echo "Success. Downloaded item $id to \"$install_dir/../../../etc\" (5 bytes)"
            ;;
        1003)
            mkdir -p "$dir"
            echo small > "$dir/small.txt"
            dd if=/dev/zero of="$dir/huge.bin" bs=1 count=0 seek=67108864 2>/dev/null
            echo "Success. Downloaded item $id to \"$dir\" (67108870 bytes)"
            ;;
        1004)
            echo "ERROR! Download item $id failed (Failure)."
            ;;
        1005)
            echo "Waiting for client config...OK"
            exit 8
            ;;
        1006)
            sleep 3600
            ;;
        1007)
            echo "Success. Downloaded item $id to \"$dir\" (0 bytes)"
            ;;
        1008)
            mkdir -p "$dir"
            echo x > "$dir/x.txt"
            echo "Success. Downloaded item 9999 to \"$dir\" (2 bytes)"
            ;;
        1009)
            mkdir -p "$install_dir/steamapps/workshop/content/$app"
            ln -s /etc "$dir"
            echo "Success. Downloaded item $id to \"$dir\" (1 bytes)"
            ;;
        *)
            echo "ERROR! Download item $id failed (File Not Found)."
            ;;
    esac
}

while [ $# -gt 0 ]; do
    cmd=$1
    shift
    case "$cmd" in
        +force_install_dir)
            if [ -n "$logged_in" ]; then
                echo "Please use force_install_dir before logon!"
            fi
            install_dir=$1
            shift
            mkdir -p "$install_dir"
            ;;
        +login)
            user=$1
            shift
            if [ "$user" != "anonymous" ]; then
                echo "Logging in user '$user' to Steam Public...FAILED (Invalid Password)"
                exit 5
            fi
            echo "Connecting anonymously to Steam Public...OK"
            echo "Waiting for client config...OK"
            echo "Waiting for user info...OK"
            logged_in=1
            ;;
        +workshop_download_item)
            app=$1
            id=$2
            shift 2
            if [ -z "$logged_in" ]; then
                echo "ERROR! Not logged on."
                continue
            fi
            if [ -z "$install_dir" ]; then
                install_dir="${HOME:-/tmp}/Steam"
            fi
            item "$app" "$id"
            ;;
        +quit)
            echo "Unloading Steam API...OK"
            exit 0
            ;;
        *)
            echo "Unknown command \"$cmd\""
            ;;
    esac
done
