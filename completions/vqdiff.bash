# bash completion for vqdiff (generated from the vqdiff app by scripts/completions.py; do not edit)
_vqdiff() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"
    local path="" word i skip=0 opts="" valued="" paths="" subs="" args=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${COMP_WORDS[i]}"
        if ((skip)); then skip=0; continue; fi
        case "$word" in
            -*) [[ " $(_vqdiff_valued "$path") " == *" $word "* ]] && skip=1 ;;
            *) [[ " $(_vqdiff_subs "$path") " == *" $word "* ]] && path="${path:+$path }$word" ;;
        esac
    done
    opts="$(_vqdiff_opts "$path")"; valued="$(_vqdiff_valued "$path")"
    paths="$(_vqdiff_paths "$path")"; subs="$(_vqdiff_subs "$path")"; args="$(_vqdiff_args "$path")"
    case "$prev" in
        --device) COMPREPLY=($(compgen -W "auto cpu cuda mps" -- "$cur")); return ;;
        --dtype) COMPREPLY=($(compgen -W "auto float32 float16 bfloat16" -- "$cur")); return ;;
        --variant) COMPREPLY=($(compgen -W "auto fp16 fp32" -- "$cur")); return ;;
        --mask-mode) COMPREPLY=($(compgen -W "any half all" -- "$cur")); return ;;
        --known) COMPREPLY=($(compgen -W "restore renoise" -- "$cur")); return ;;
        --sampler) COMPREPLY=($(compgen -W "auto reference fast" -- "$cur")); return ;;
        --reveal) COMPREPLY=($(compgen -W "posterior random purity" -- "$cur")); return ;;
        --stride-mode) COMPREPLY=($(compgen -W "exact original" -- "$cur")); return ;;
    esac
    if [[ " $valued " == *" $prev "* ]]; then
        if [[ " $paths " == *" $prev "* ]]; then COMPREPLY=($(compgen -f -- "$cur")); fi
        return
    fi
    if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "$opts" -- "$cur")); return; fi
    if [[ -n "$subs" ]]; then COMPREPLY=($(compgen -W "$subs" -- "$cur")); return; fi
    if [[ -n "$args" ]]; then COMPREPLY=($(compgen -W "$args" -- "$cur")); return; fi
    COMPREPLY=($(compgen -f -- "$cur"))
}

_vqdiff_opts() {
    case "$1" in
        "") echo "--version -V --debug --help -h" ;;
        "bench") echo "--model -m --config --device --dtype --steps --batch --sampler --repeats --warmup --phases-only --vs-diffusers --diffusers-dtype --guidance -g --truncation -t --max-run-seconds --peak-tflops --compile --no-compile --cuda-graphs --no-cuda-graphs --threads --json --output -o --overwrite --quiet -q --help -h" ;;
        "completion") echo "--help -h" ;;
        "config") echo "--help -h" ;;
        "config path") echo "--help -h" ;;
        "config show") echo "--json --help -h" ;;
        "dataset") echo "--help -h" ;;
        "dataset heldout") echo "--json --help -h" ;;
        "dataset shapes") echo "--count -n --seed -s --resolution -r --split --omit-rate --overwrite --json --quiet -q --help -h" ;;
        "decode") echo "--output -o --model -m --revision --offline --cache-dir --variant --device --dtype --overwrite --quiet -q --help -h" ;;
        "download") echo "--revision --variant --dtype --device --offline --cache-dir --json --quiet -q --help -h" ;;
        "encode") echo "--output -o --keep-size --model -m --revision --offline --cache-dir --variant --device --dtype --overwrite --quiet -q --help -h" ;;
        "eval") echo "--captions --count -n --seed -s --steps --stride --guidance -g --truncation -t --batch-size -b --sampler --reveal --purity --purity-weight --tokens-per-call --stride-mode --model -m --revision --offline --cache-dir --variant --device --dtype --compile --no-compile --cuda-graphs --no-cuda-graphs --threads --vs-diffusers --save-images --output -o --overwrite --json --quiet -q --help -h" ;;
        "generate") echo "--prompts-file -f --output -o --num-images -n --seed -s --steps --stride --guidance -g --truncation -t --batch-size -b --sampler --reveal --purity --purity-weight --tokens-per-call --stride-mode --model -m --revision --offline --cache-dir --variant --device --dtype --compile --no-compile --cuda-graphs --no-cuda-graphs --threads --from-image --lora --lora-scale --same-batch --save-tokens --trajectory --animate --save-steps --no-metadata --overwrite --skip-existing --shard --json --quiet -q --dry-run --help -h" ;;
        "info") echo "--json --help -h" ;;
        "inpaint") echo "--mask -M --prompt -p --mask-mode --grow --start-step --known --feather --no-composite --save-token-mask --num-images -n --seed -s --steps --stride --guidance -g --truncation -t --batch-size -b --sampler --reveal --purity --purity-weight --tokens-per-call --stride-mode --output -o --model -m --revision --offline --cache-dir --variant --device --dtype --compile --no-compile --cuda-graphs --no-cuda-graphs --threads --save-tokens --trajectory --animate --save-steps --no-metadata --overwrite --json --quiet -q --dry-run --help -h" ;;
        "models") echo "--help -h" ;;
        "models list") echo "--cache-dir --json --help -h" ;;
        "models path") echo "--revision --dtype --cache-dir --json --help -h" ;;
        "models rm") echo "--revision --yes -y --cache-dir --json --help -h" ;;
        "train") echo "--help -h" ;;
        "train bench") echo "--arch --batch-size --steps --warmup --lora --device --mixed-precision --json --help -h" ;;
        "train transformer") echo "--output -o --vqvae --text-encoder --train-text-encoder --from --lora --lora-alpha --resolution --layers --width --heads --timesteps --text-layers --text-width --caption-dropout --aux-weight --caption-column --strict --validation-prompt --validation-images --steps --batch-size --grad-accum --lr --warmup --weight-decay --clip-grad --ema --mixed-precision --checkpoint-every --keep --log-every --validate-every --seed --device --report-to --resume --overwrite --offline --cache-dir --quiet -q --help -h" ;;
        "train vqvae") echo "--output -o --resolution --downsample --codebook-size --embed-dim --channels --layers-per-block --norm-groups --disc-start --no-disc --disc-weight --revive-every --strict --steps --batch-size --grad-accum --lr --warmup --weight-decay --clip-grad --ema --mixed-precision --checkpoint-every --keep --log-every --validate-every --seed --device --report-to --resume --overwrite --quiet -q --help -h" ;;
        "vary") echo "--strength --prompt -p --num-images -n --seed -s --steps --stride --guidance -g --truncation -t --batch-size -b --sampler --reveal --purity --purity-weight --tokens-per-call --stride-mode --output -o --model -m --revision --offline --cache-dir --variant --device --dtype --compile --no-compile --cuda-graphs --no-cuda-graphs --threads --save-tokens --trajectory --animate --save-steps --no-metadata --overwrite --json --quiet -q --dry-run --help -h" ;;
    esac
}
_vqdiff_valued() {
    case "$1" in
        "") echo "" ;;
        "bench") echo "--model -m --config --device --dtype --steps --batch --sampler --repeats --warmup --diffusers-dtype --guidance -g --truncation -t --max-run-seconds --peak-tflops --threads --output -o" ;;
        "completion") echo "" ;;
        "config") echo "" ;;
        "config path") echo "" ;;
        "config show") echo "" ;;
        "dataset") echo "" ;;
        "dataset heldout") echo "" ;;
        "dataset shapes") echo "--count -n --seed -s --resolution -r --split --omit-rate" ;;
        "decode") echo "--output -o --model -m --revision --cache-dir --variant --device --dtype" ;;
        "download") echo "--revision --variant --dtype --device --cache-dir" ;;
        "encode") echo "--output -o --model -m --revision --cache-dir --variant --device --dtype" ;;
        "eval") echo "--captions --count -n --seed -s --steps --stride --guidance -g --truncation -t --batch-size -b --sampler --reveal --purity-weight --tokens-per-call --stride-mode --model -m --revision --cache-dir --variant --device --dtype --threads --save-images --output -o" ;;
        "generate") echo "--prompts-file -f --output -o --num-images -n --seed -s --steps --stride --guidance -g --truncation -t --batch-size -b --sampler --reveal --purity-weight --tokens-per-call --stride-mode --model -m --revision --cache-dir --variant --device --dtype --threads --from-image --lora --lora-scale --save-tokens --trajectory --animate --save-steps --shard" ;;
        "info") echo "" ;;
        "inpaint") echo "--mask -M --prompt -p --mask-mode --grow --start-step --known --feather --save-token-mask --num-images -n --seed -s --steps --stride --guidance -g --truncation -t --batch-size -b --sampler --reveal --purity-weight --tokens-per-call --stride-mode --output -o --model -m --revision --cache-dir --variant --device --dtype --threads --save-tokens --trajectory --animate --save-steps" ;;
        "models") echo "" ;;
        "models list") echo "--cache-dir" ;;
        "models path") echo "--revision --dtype --cache-dir" ;;
        "models rm") echo "--revision --cache-dir" ;;
        "train") echo "" ;;
        "train bench") echo "--arch --batch-size --steps --warmup --lora --device --mixed-precision" ;;
        "train transformer") echo "--output -o --vqvae --text-encoder --from --lora --lora-alpha --resolution --layers --width --heads --timesteps --text-layers --text-width --caption-dropout --aux-weight --caption-column --validation-prompt --validation-images --steps --batch-size --grad-accum --lr --warmup --weight-decay --clip-grad --ema --mixed-precision --checkpoint-every --keep --log-every --validate-every --seed --device --report-to --cache-dir" ;;
        "train vqvae") echo "--output -o --resolution --downsample --codebook-size --embed-dim --channels --layers-per-block --norm-groups --disc-start --disc-weight --revive-every --steps --batch-size --grad-accum --lr --warmup --weight-decay --clip-grad --ema --mixed-precision --checkpoint-every --keep --log-every --validate-every --seed --device --report-to" ;;
        "vary") echo "--strength --prompt -p --num-images -n --seed -s --steps --stride --guidance -g --truncation -t --batch-size -b --sampler --reveal --purity-weight --tokens-per-call --stride-mode --output -o --model -m --revision --cache-dir --variant --device --dtype --threads --save-tokens --trajectory --animate --save-steps" ;;
    esac
}
_vqdiff_paths() {
    case "$1" in
        "") echo "" ;;
        "bench") echo "--model -m --output -o" ;;
        "completion") echo "" ;;
        "config") echo "" ;;
        "config path") echo "" ;;
        "config show") echo "" ;;
        "dataset") echo "" ;;
        "dataset heldout") echo "" ;;
        "dataset shapes") echo "" ;;
        "decode") echo "--output -o --cache-dir" ;;
        "download") echo "--cache-dir" ;;
        "encode") echo "--output -o --cache-dir" ;;
        "eval") echo "--captions --cache-dir --save-images --output -o" ;;
        "generate") echo "--prompts-file -f --output -o --cache-dir --from-image --lora --save-tokens --trajectory --animate --save-steps" ;;
        "info") echo "" ;;
        "inpaint") echo "--mask -M --save-token-mask --output -o --cache-dir --save-tokens --trajectory --animate --save-steps" ;;
        "models") echo "" ;;
        "models list") echo "--cache-dir" ;;
        "models path") echo "--cache-dir" ;;
        "models rm") echo "--cache-dir" ;;
        "train") echo "" ;;
        "train bench") echo "" ;;
        "train transformer") echo "--output -o --cache-dir" ;;
        "train vqvae") echo "--output -o" ;;
        "vary") echo "--output -o --cache-dir --save-tokens --trajectory --animate --save-steps" ;;
    esac
}
_vqdiff_subs() {
    case "$1" in
        "") echo "bench completion config dataset decode download encode eval generate info inpaint models train vary" ;;
        "bench") echo "" ;;
        "completion") echo "" ;;
        "config") echo "path show" ;;
        "config path") echo "" ;;
        "config show") echo "" ;;
        "dataset") echo "heldout shapes" ;;
        "dataset heldout") echo "" ;;
        "dataset shapes") echo "" ;;
        "decode") echo "" ;;
        "download") echo "" ;;
        "encode") echo "" ;;
        "eval") echo "" ;;
        "generate") echo "" ;;
        "info") echo "" ;;
        "inpaint") echo "" ;;
        "models") echo "list path rm" ;;
        "models list") echo "" ;;
        "models path") echo "" ;;
        "models rm") echo "" ;;
        "train") echo "bench transformer vqvae" ;;
        "train bench") echo "" ;;
        "train transformer") echo "" ;;
        "train vqvae") echo "" ;;
        "vary") echo "" ;;
    esac
}
_vqdiff_args() {
    case "$1" in
        "") echo "" ;;
        "bench") echo "" ;;
        "completion") echo "bash zsh fish" ;;
        "config") echo "" ;;
        "config path") echo "" ;;
        "config show") echo "" ;;
        "dataset") echo "" ;;
        "dataset heldout") echo "" ;;
        "dataset shapes") echo "" ;;
        "decode") echo "" ;;
        "download") echo "" ;;
        "encode") echo "" ;;
        "eval") echo "" ;;
        "generate") echo "" ;;
        "info") echo "" ;;
        "inpaint") echo "" ;;
        "models") echo "" ;;
        "models list") echo "" ;;
        "models path") echo "" ;;
        "models rm") echo "" ;;
        "train") echo "" ;;
        "train bench") echo "" ;;
        "train transformer") echo "" ;;
        "train vqvae") echo "" ;;
        "vary") echo "" ;;
    esac
}
complete -o default -o bashdefault -F _vqdiff vqdiff
