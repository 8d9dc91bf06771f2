_mcpbill_completion() {
    mapfile -t COMPREPLY < <(env COMP_LINE="${COMP_LINE:0:COMP_POINT}" \
        COMP_WORDBREAKS="$COMP_WORDBREAKS" _MCPBILL_COMPLETE=complete_bash "$1")
    [[ -n "${COMPREPLY[*]}" ]] || COMPREPLY=()
    return 0
}

complete -o default -F _mcpbill_completion mcpbill